"""Config loading: big_vision-style `path:arg` plus `--config.a.b=v` overrides, one-line errors."""

import re
import textwrap

import pytest

from genjax.config import load_config, parse_arg
from genjax.errors import UserError

CONFIG = textwrap.dedent('''
    import ml_collections
    from genjax.config import parse_arg

    def get_config(arg=None):
        arg = parse_arg(arg, smoke=False, variant="S/2")
        c = ml_collections.ConfigDict()
        c.model = dict(variant=arg.variant, depth=2 if arg.smoke else 12)
        c.optim = dict(lr=1e-4, warmup_steps=100)
        return c.lock()
''')


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "toy.py"
    p.write_text(CONFIG)
    return str(p)


def test_parse_arg_types():
    a = parse_arg("variant=B/2,smoke=True,steps=10,lr=0.5", variant="S/2", smoke=False, steps=1, lr=1.0)
    assert (a.variant, a.smoke, a.steps, a.lr) == ("B/2", True, 10, 0.5)
    assert parse_arg(None, smoke=False).smoke is False


@pytest.mark.parametrize("arg,needle", [("nope=1", "nope"), ("smoke", "key=value"),
                                        ("smoke=maybe", "smoke='maybe'"), ("steps=x", "steps='x'")])
def test_parse_arg_errors_name_the_field(arg, needle):
    with pytest.raises(UserError, match=needle):
        parse_arg(arg, smoke=False, steps=1)


def test_load_with_arg_and_overrides(cfg_path):
    c = load_config(f"{cfg_path}:smoke=True,variant=B/4", ["--config.optim.lr=3e-4"])
    assert c.model.depth == 2 and c.model.variant == "B/4"
    assert c.optim.lr == pytest.approx(3e-4)
    with pytest.raises(AttributeError):  # locked: no new fields
        c.model.new_field = 1


@pytest.mark.parametrize("override,needle", [
    ("--config.optim.nope=1", "--config.optim.nope: unknown key 'nope' in config.optim (known: lr, warmup_steps)"),
    ("--config.nope.a=1", "--config.nope.a: unknown key 'nope' in config (known: model, optim)"),
    ("--config.optim.warmup_steps=abc", "warmup_steps"),
])
def test_bad_override_is_one_line_user_error(cfg_path, override, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        load_config(cfg_path, [override])
    assert "\n" not in str(e.value)


def test_user_error_inside_get_config_is_one_line(cfg_path):
    with pytest.raises(UserError, match="nope") as e:
        load_config(f"{cfg_path}:nope=1")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="no such config file"):
        load_config("configs/does_not_exist.py")


def test_check_keys_names_the_key_a_close_match_and_the_allowed_ones():
    from genjax.config import check_keys

    check_keys("optim", {"lr": 1.0}, ("lr", "b1"))
    check_keys("optim", None, ("lr",))
    with pytest.raises(UserError, match=r"^optim\.lrr: unknown key in config\.optim \(did you mean 'lr'\? allowed: b1, lr\)$"):
        check_keys("optim", {"lrr": 1.0}, ("lr", "b1"))
    with pytest.raises(UserError, match=r"^zzz: unknown key in the config \(allowed: seed\)$"):
        check_keys("", {"zzz": {"a": 1}}, ("seed",))


@pytest.mark.parametrize("text, message", [
    ("import ml_collections\n\ndef get_config(arg=None):\n    c = dict(\n    return c\n",
     r"^--config='.*bad\.py': line 4: '\(' was never closed$"),
    ("X = 1\n", r"^--config='.*bad\.py': defines no get_config\(arg=None\) function$"),
    ("def get_config(arg=None):\n    return {}['x']\n", r"^--config='.*bad\.py': line 2: KeyError: 'x'$"),
    ("import genjax_no_such_module\n\ndef get_config(arg=None):\n    return None\n", r"^--config='.*bad\.py': line 1: ModuleNotFoundError: "),
    ("def get_config(arg=None):\n    return 1 +\n", r"^--config='.*bad\.py': line 2: invalid syntax"),
])
def test_a_config_file_that_does_not_load_is_one_line_naming_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_config(str(path))
    assert "\n" not in str(e.value) and "config_config" not in str(e.value)
