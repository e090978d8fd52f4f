"""The workdir lock: `WORKDIR/.lock`, so that two runs never train into one workdir at once.

The lock file is created atomically (`O_CREAT | O_EXCL`) and holds the owner as JSON: host, pid
and the time it was taken. A second run into the same workdir fails at once with one line naming
the owner. A stale lock (same host, its process gone: killed by SIGKILL or OOM) is taken over with
a one-line note on stderr. A lock on another host is never taken over (its process cannot be
checked from here): the user deletes it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from typing import Any, Iterator

import jax
import numpy as np

from genjax.errors import UserError, check, fail

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if {"host", "pid", "since"} <= set(owner) else None
    except (OSError, ValueError, TypeError):
        return None


def acquire(workdir: str) -> dict[str, Any]:
    """Create `workdir` if needed and take its lock; returns the owner record written.

    Raises:
      UserError: `workdir` is not a folder or cannot be written; it is locked by a live process (or
        by one on another host); its lock file is unreadable.
    """
    check(not os.path.exists(workdir) or os.path.isdir(workdir), "workdir", workdir,
          "is a file, not a folder")
    path = os.path.join(workdir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        fail("workdir", workdir, f"cannot be created ({e.strerror})")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(workdir, path, me["host"])
            continue
        except OSError as e:
            fail("workdir", workdir, f"cannot be written ({e.strerror}: {path})")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me
    fail("workdir", workdir, f"its lock {path} keeps being taken by other runs")


def _take_over_if_stale(workdir: str, path: str, host: str) -> None:
    """Remove the stale lock at `path` (noting it on stderr), or raise naming its live owner."""
    owner = _read(path)
    if owner is None:
        fail("workdir", workdir, f"holds an unreadable lock file {path}; delete it if no run is "
             "using this workdir")
    who = f"pid {owner['pid']} on host {owner['host']} since {owner['since']}"
    if owner["host"] != host or _alive(int(owner["pid"])):
        fail("workdir", workdir, f"in use by {who}; wait for that run to end or use another "
             f"--workdir (if it is gone, delete {path})")
    # Rename, then check that what we renamed is the stale lock (not a fresh one another process
    # created meanwhile, which goes back).
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process took it over first
        return
    if _read(aside) != owner:
        os.rename(aside, path)
        return
    os.remove(aside)
    print(f"genjax: note: took over the stale lock of {who} (that process is gone) in {workdir}",
          file=sys.stderr, flush=True)


def release(workdir: str, owner: dict[str, Any]) -> None:
    """Remove `workdir`'s lock if it still holds `owner` (the record `acquire` returned)."""
    path = os.path.join(workdir, LOCK_NAME)
    if _read(path) == owner:
        os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold `workdir`'s lock for the body (released in `finally`, also after an error or a
    preemption save). `enabled=False` (processes other than 0 of a multi-host run, which share
    the workdir) takes nothing.

    Raises:
      UserError: from `acquire`.
    """
    owner = error = None
    if enabled:
        try:
            owner = acquire(workdir)
        except UserError as e:
            error = e
    if jax.process_count() > 1:  # every process fails together when process 0 could not lock
        from jax.experimental import multihost_utils
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            fail("workdir", workdir, "process 0 could not lock it (see its error)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if owner is not None:
            release(workdir, owner)
