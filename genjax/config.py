"""Config loading, big_vision style.

A config is a Python file `configs/NAME.py` defining `get_config(arg=None)` that returns a locked
`ml_collections.ConfigDict`. It is selected as `--config configs/NAME.py:key=value,...` and
overridden field by field with `--config.section.field=value`; both are parsed by
`ml_collections.config_flags`, which checks every override against the config's keys and types.
"""

from __future__ import annotations

import os
import sys
import difflib
import traceback
from typing import Any, Collection, Mapping, Sequence

import ml_collections

from genjax.errors import UserError


def check_keys(section_name: str, section: Mapping[str, Any] | None, allowed: Collection[str]) -> None:
    """Refuse a key of `section` (the config section `section_name`, e.g. "optim"; "" for the
    top level) that its consumer does not read: one line naming the key, a close match and the
    allowed keys. A missing section (None) passes.

    Raises:
      UserError: e.g. `optim.ema_dacay: unknown key (did you mean 'ema_decay'? allowed: ...)`.
    """
    if section is None:
        return
    for key in sorted(set(section.keys()) - set(allowed)):
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        field = f"{section_name}.{key}" if section_name else key
        where = f"config.{section_name}" if section_name else "the config"
        raise UserError(f"{field}: unknown key in {where} ({hint}allowed: {', '.join(sorted(allowed))})")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse a config argument `"key=value,key2=value2"` into a ConfigDict.

    Every key must appear in `defaults`; values are converted to the type of the default
    (bools accept true/false/1/0, case-insensitive). Example:
    `parse_arg("variant=B/2,smoke=True", variant="S/2", smoke=False)`.

    Raises:
      UserError: unknown key, missing `=`, or a value that does not convert.
    """
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"config arg {item!r}: must be key=value (known keys: {', '.join(defaults)})")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise UserError(f"config arg {key}={value!r}: unknown key (known keys: {', '.join(defaults)})")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0"):
                    raise ValueError
                converted: Any = lowered in ("true", "1")
            elif default is None:
                converted = value
            else:
                converted = type(default)(value)
        except ValueError:
            raise UserError(
                f"config arg {key}={value!r}: must be a {type(default).__name__}") from None
        out[key] = converted
    return out


def _innermost_user_error(e: BaseException | None) -> UserError | None:
    found = None
    while e is not None:
        if isinstance(e, UserError):
            found = e
        e = e.__cause__ or e.__context__
    return found


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `spec` = `path/to/config.py[:arg]` and apply `--config.a.b=value` overrides.

    Returns the locked ConfigDict. When the config file's folder is a package (holds
    `__init__.py`, as `configs/` does), the folder above it is put on `sys.path`, so configs import
    their shared helpers as a package module (`from configs import common`).

    Raises:
      UserError: missing or unreadable config file; a syntax error in it (naming the file and
        line); a config without `get_config`; an error raised while running it (naming its line);
        an unknown override key or an override value of the wrong type.
    """
    from absl import flags
    from ml_collections import config_flags

    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise UserError(f"--config={path!r}: no such config file")
    _check_syntax(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        folder = os.path.dirname(folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    for o in overrides:
        if not o.startswith("--config."):
            raise UserError(f"override {o!r}: must look like --config.section.field=value")
    argv = ["genjax", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    # sys_argv: config_flags registers the override flags it finds in this argv.
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except UserError:
        raise
    except flags.Error as e:  # unknown key, bad type: absl's message names the flag
        inner = _innermost_user_error(e)
        if inner is not None:  # a UserError raised inside get_config, wrapped by absl
            raise UserError(str(inner)) from None
        msg = " ".join(str(e).split())
        raise UserError(f"config override: {msg}") from None
    except Exception as e:  # raised by the config file itself, or an override's key path
        if isinstance(e, AttributeError) and "get_config" in str(e) and not _in_file(e, path):
            raise UserError(f"--config={path!r}: defines no get_config(arg=None) function") from None
        if overrides and isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            _check_override_keys(spec, overrides)  # most often an override naming a missing key
        line = _in_file(e, path)
        msg = " ".join(str(e).split())
        if line:  # raised by the file's own code: say where and what
            msg = f"line {line}: {type(e).__name__}: {msg}"
        raise UserError(f"--config={spec!r}: {msg}") from None
    return fv.config


def _check_syntax(path: str) -> None:
    """Parse the config file: a syntax error is one line naming the file and line, and a file
    that binds no top-level `get_config` (def, assignment or import) is refused by name here (the
    module loader could otherwise reuse a `get_config` left by a config loaded earlier)."""
    import ast

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except SyntaxError as e:
        raise UserError(f"--config={path!r}: line {e.lineno}: {e.msg}") from None
    except (OSError, ValueError) as e:  # unreadable; null bytes
        raise UserError(f"--config={path!r}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if "get_config" not in names and "*" not in names:
        raise UserError(f"--config={path!r}: defines no get_config(arg=None) function")


def _in_file(e: BaseException, path: str) -> int | None:
    """The line of the innermost frame of `e`'s traceback inside the config file `path`, if any."""
    target = os.path.abspath(path)
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == target]
    return lines[-1] if lines else None


def _check_override_keys(spec: str, overrides: Sequence[str]) -> None:
    """Raise a UserError naming the first override whose key path is not in the config of `spec`
    (e.g. `--config.model.nope: unknown key 'nope' in config.model (known: ...)`)."""
    base = load_config(spec)
    for o in overrides:
        name = o[len("--config."):].split("=", 1)[0]
        node, walked = base, ["config"]
        for key in name.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
                raise UserError(f"--config.{name}: unknown key {key!r} in {'.'.join(walked)} (known: {known})")
            node, walked = node[key], walked + [key]
