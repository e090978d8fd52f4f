"""Files on disk: atomic writes and one-line errors for file-system faults.

Every output genjax writes goes through `atomic_path`: the content is written to a temporary file
in the destination folder and `os.replace`d onto the final name only when complete, so a crash or
a full disk never leaves a half-written file under the final name, and never destroys the
previous good file. An `OSError` while writing (ENOSPC, EROFS, EACCES, ...) becomes a one-line
`UserError` naming the path. `check_writable_dir` / `check_new_file` let commands refuse bad
destinations before any work starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Iterator

from genjax.errors import UserError, check

# OSErrors that are the user's environment (a full or read-only disk, a path that is a file), not
# a bug: the CLI prints them as one line (`genjax.cli.main`).
FS_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOTDIR", "EISDIR", "EEXIST", "ENAMETOOLONG",
    "ENOENT", "EFBIG") if hasattr(errno, name))


def describe_os_error(e: OSError) -> str:
    """`'<path>': <strerror> [Errno N]` for an OSError (the path when it carries one)."""
    what = f"{e.strerror or e} [Errno {e.errno}]" if e.errno else str(e)
    return f"{e.filename!r}: {what}" if e.filename else what


def write_error(field: str, path: str, e: OSError, size: int | None) -> UserError:
    need = f" (needs ~{size} bytes)" if size and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) else ""
    return UserError(f"{field}={path!r}: cannot write: {e.strerror or e} [Errno {e.errno}]{need}; "
                     "nothing was written under that name (a previous file there is unchanged)")


@contextlib.contextmanager
def atomic_path(path, field: str = "path", *, size: int | None = None) -> Iterator[str]:
    """Yield a temporary path next to `path` (same extension); `os.replace` it onto `path` when the
    block finishes without an exception, else remove it (an existing `path` stays untouched).

    `size`: the bytes about to be written, named in the error of a full disk.

    Raises:
      UserError: the folder cannot be created or written, or writing fails (ENOSPC, EROFS, ...),
        naming `field` and `path`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    stem, ext = os.path.splitext(os.path.basename(path))
    check(not os.path.isdir(path), field, path, "is a folder; give a file name")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output is as readable as any other
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(field, path, e, size) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data: bytes, field: str = "path") -> str:
    """Write `data` to `path` atomically (see `atomic_path`). Returns `path`."""
    with atomic_path(path, field, size=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return os.fspath(path)


def write_text(path, text: str, field: str = "path") -> str:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`). Returns `path`."""
    return write_bytes(path, text.encode(), field)


def write_json(path, obj: Any, field: str = "path", **kwargs) -> str:
    """`json.dumps(obj, **kwargs)` written to `path` atomically (see `atomic_path`)."""
    return write_text(path, json.dumps(obj, **kwargs), field)


def check_writable_dir(path, field: str) -> None:
    """Refuse a folder that cannot be written: `path` (existing, or to be created under its nearest
    existing ancestor) must be a folder, and that folder writable.

    Raises:
      UserError: `path` or an ancestor is a file, or the folder is not writable (read-only disk,
        no permission).
    """
    path = os.path.abspath(os.fspath(path))
    check(not os.path.exists(path) or os.path.isdir(path), field, path, "is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    check(os.path.isdir(existing), field, path, f"cannot be created: {existing} is a file, not a folder")
    check(os.access(existing, os.W_OK | os.X_OK), field, path,
          f"is not writable ({existing}: permission denied or read-only)")
    try:  # os.access does not see a read-only mount for root, nor some network file systems
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{field}={path!r}: is not writable ({describe_os_error(e)})") from e


def check_new_file(path, field: str, overwrite: bool = False) -> None:
    """Refuse an output path that is a folder, that exists (unless `overwrite`), or whose folder
    cannot be written.

    Raises:
      UserError: as described, naming `field` and `path`.
    """
    path = os.fspath(path)
    check(not os.path.isdir(path), field, path, "is a folder; give a file name")
    check(overwrite or not os.path.lexists(path), field, path,
          "exists; pass --overwrite to replace it (or choose another name)")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), field)
