"""Rows of the bad-input catalogue (tests/test_bad_inputs.py), one module per area; each module
defines `cases(workspace: Path) -> list[Case]`."""

from __future__ import annotations

from typing import Callable, NamedTuple


class Case(NamedTuple):
    """One row: `run` is a list of CLI arguments or a zero-argument callable; `status` the exit
    status; `first_line` a regex searched in the single line of stderr (or the UserError message)."""

    name: str
    run: list[str] | Callable[[], object]
    status: int
    first_line: str
