"""User-facing errors.

`UserError` marks a problem with the user's input (a config value, a file, a shape) as opposed to
a bug. Its message is one line naming the field, the value and the rule; the CLI prints exactly
that line and exits with status 2, without a traceback.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """Bad user input: a one-line message naming the field, its value and the rule."""


def fail(field: str, value: Any, rule: str) -> None:
    """Raise `UserError("<field>=<value!r>: <rule>")`."""
    raise UserError(f"{field}={value!r}: {rule}")


def check(ok: bool, field: str, value: Any, rule: str) -> None:
    """Raise `UserError` naming `field`, `value` and `rule` unless `ok`."""
    if not ok:
        fail(field, value, rule)
