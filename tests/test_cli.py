"""The `genjax` command: every subcommand has --help; user errors are one line, exit 2."""

import subprocess
import sys

import pytest

from genjax import cli

SUBCOMMANDS = ["train", "sample", "eval", "convert", "data", "demo"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: genjax " + sub in capsys.readouterr().out


def test_user_error_is_one_line_no_traceback(tmp_path):
    # A missing config file: one line on stderr, exit code 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "genjax.cli", "train", "--config", str(tmp_path / "nope.py"),
         "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.py" in lines[0] and "Traceback" not in proc.stderr


def test_import_genjax_is_light():
    # Importing the package must not pull in JAX or model code.
    code = "import sys, genjax; print('jax' in sys.modules, 'genjax.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]
