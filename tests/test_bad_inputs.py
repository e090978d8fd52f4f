"""The catalogue of bad inputs and faults (issue 21): one case per row, each with the command or
call, the expected exit status and the expected first line of stderr (a regex searched in it).

A row is `Case(name, run, status, first_line)` (tests/bad_inputs/__init__.py); the rows live in
one module per area under tests/bad_inputs/ (outputs, workdir, config, inputs, apis):
  run         a list of CLI arguments (`genjax.cli.main(argv)` in this process, so a row costs
              no interpreter start-up), or a zero-argument callable that must raise
              `genjax.errors.UserError` (status 2) whose message matches `first_line`.
  status      the exit status (2 = user error, 1 = run-time failure such as divergence).
  first_line  a regex that must match (re.search) the first line of stderr; stderr must have
              exactly one non-empty line (no traceback).

Cases that need files make them under the `workspace` fixture (a temporary folder, one per
module), each area in its own subfolder.
"""

from __future__ import annotations

import re
from pathlib import Path
import pytest

from genjax import cli
from genjax.errors import UserError
from tests.bad_inputs import Case, apis, config, inputs, outputs, workdir


def run_case(case: Case, capsys) -> tuple[int, list[str]]:
    """Run one row; returns (exit status, non-empty stderr lines)."""
    if callable(case.run):
        try:
            case.run()
        except UserError as e:
            return 2, [line for line in str(e).splitlines() if line.strip()]
        return 0, []
    capsys.readouterr()
    status = cli.main([str(a) for a in case.run])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def check_case(case: Case, capsys) -> None:
    status, lines = run_case(case, capsys)
    assert status == case.status, (case.name, status, lines[:5])
    assert len(lines) == 1, (case.name, lines[:20])
    assert re.search(case.first_line, lines[0]), (case.name, lines[0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A temporary folder for the cases' files (each area adds what it needs under its own name)."""
    return tmp_path_factory.mktemp("bad_inputs")


AREAS = (outputs, workdir, config, inputs, apis)


def _all_cases(workspace: Path) -> list[Case]:
    return [case for area in AREAS for case in area.cases(workspace / area.__name__.rsplit(".", 1)[-1])]


def test_catalogue(workspace, capsys):
    """Every row gives its exit status and exactly its one-line error."""
    for area in AREAS:
        (workspace / area.__name__.rsplit(".", 1)[-1]).mkdir(exist_ok=True)
    cases = _all_cases(workspace)
    failures = []
    for case in cases:
        try:
            check_case(case, capsys)
        except AssertionError as e:
            failures.append(f"{case.name}: {e}")
    assert not failures, "\n".join(failures)
