"""Bad-input catalogue rows: inputs (issue 21)."""

from __future__ import annotations

from pathlib import Path

from tests.bad_inputs import Case


def cases(workspace: Path) -> list[Case]:
    return []
