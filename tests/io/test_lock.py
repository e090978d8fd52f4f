"""The workdir lock (issue 21, defect 3): atomic create, a live owner refuses, a stale one is
taken over with a note, release removes only our own lock."""

import json
import os
import socket
import subprocess

import pytest

from genjax.errors import UserError
from genjax.io import lock


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(workdir, **owner):
    (workdir / lock.LOCK_NAME).write_text(json.dumps(owner))


def test_a_held_lock_refuses_a_second_run_naming_the_owner(tmp_path):
    owner = lock.acquire(str(tmp_path))
    assert json.loads((tmp_path / ".lock").read_text()) == owner
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"^workdir='{tmp_path}': in use by pid {os.getpid()} on "
                       rf"host {socket.gethostname()} since {owner['since']}; wait"):
        lock.acquire(str(tmp_path))
    lock.release(str(tmp_path), owner)
    assert not (tmp_path / ".lock").exists()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, host=socket.gethostname(), pid=pid, since="2026-01-01T00:00:00")
    owner = lock.acquire(str(tmp_path))
    assert owner["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"genjax: note: took over the stale lock of pid {pid} on host "
                   f"{socket.gethostname()} since 2026-01-01T00:00:00 (that process is gone) in {tmp_path}"]
    assert not [n for n in os.listdir(tmp_path) if "stale" in n]


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, host="other-host", pid=dead_pid(), since="2026-01-01T00:00:00")
    with pytest.raises(UserError, match=r": in use by pid \d+ on host other-host since"):
        lock.acquire(str(tmp_path))


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / ".lock").write_text("")  # killed between create and write
    with pytest.raises(UserError, match=r"holds an unreadable lock file .*\.lock; delete it if no run"):
        lock.acquire(str(tmp_path))


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    owner = lock.acquire(str(tmp_path))
    write_lock(tmp_path, host="h", pid=1, since="later")
    lock.release(str(tmp_path), owner)
    assert (tmp_path / ".lock").exists()


def test_hold_releases_after_an_error_and_workdir_must_be_a_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with lock.hold(str(tmp_path / "w")):
            assert (tmp_path / "w" / ".lock").exists()
            raise RuntimeError
    assert not (tmp_path / "w" / ".lock").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^workdir='.*f': is a file, not a folder"):
        lock.acquire(str(tmp_path / "f"))
