"""Bad-input catalogue rows: outputs (issue 21): destinations that exist, are folders, lie under a
file, have the wrong extension; a full disk while writing. Every row fails before any model is
restored, data loaded or anything compiled."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from unittest import mock

import numpy as np

from tests.bad_inputs import Case

PROMPT = ["--prompt", "digit 1"]


def _full_disk_savez(out: Path):
    def run():
        from genjax.io import media

        def savez(f, **arrays):
            f.write(b"PK partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with mock.patch.object(np, "savez", savez):
            media.write_outputs(str(out), np.zeros((1, 2, 4, 4, 1), np.uint8), ["digit 1"])
    return run


def _media(writer: str, path: Path, arr=None):
    def run():
        from genjax.io import media

        getattr(media, writer)(path, np.zeros((1, 2, 4, 4, 1), np.uint8) if arr is None else arr)
    return run


def cases(workspace: Path) -> list[Case]:
    w = workspace
    existing = w / "samples.npz"
    existing.write_bytes(b"the demo's 96 videos")
    a_file = w / "a_file"
    a_file.write_text("not a folder")
    folder = w / "folder.npz"
    folder.mkdir(exist_ok=True)
    gif_folder = w / "preview.gif"
    gif_folder.mkdir(exist_ok=True)
    json_folder = w / "m.json"
    json_folder.mkdir(exist_ok=True)
    missing = str(w / "no_run")
    under_file = a_file / "sub"
    src = w / "src"  # an (empty) diffusers folder: --out is refused before it is read
    src.mkdir(exist_ok=True)
    mp4_folder = w / "folder.mp4"
    mp4_folder.mkdir(exist_ok=True)
    config = "configs/dit_mnist.py:smoke=True"
    return [
        # genjax sample: --out is checked before the workdir is even read
        Case("sample --out exists", ["sample", "--workdir", missing, *PROMPT, "--out", existing],
             2, r"^genjax sample: error: --out='.*samples\.npz': exists; pass --overwrite"),
        Case("sample --out is a folder", ["sample", "--workdir", missing, *PROMPT, "--out", folder],
             2, r"^genjax sample: error: --out='.*folder\.npz': is a folder"),
        Case("sample --out under a file", ["sample", "--workdir", missing, *PROMPT, "--out", under_file / "x.npz"],
             2, r"^genjax sample: error: --out='.*a_file/sub': cannot be created: .*a_file is a file"),
        Case("sample --out not .npz", ["sample", "--workdir", missing, *PROMPT, "--out", w / "x.gif"],
             2, r"^genjax sample: error: --out='.*x\.gif': must be a \.npz file"),
        Case("sample --workdir is a file", ["sample", "--workdir", a_file, *PROMPT, "--out", w / "new.npz"],
             2, r"^genjax sample: error: --workdir='.*a_file': is a file, not a folder"),
        # genjax train / demo: the workdir before any work
        Case("train --workdir is a file", ["train", "--config", config, "--workdir", a_file],
             2, r"^genjax train: error: --workdir='.*a_file': is a file, not a folder"),
        Case("train --workdir under a file", ["train", "--config", config, "--workdir", under_file],
             2, r"^genjax train: error: --workdir='.*a_file/sub': cannot be created: .*a_file is a file"),
        Case("demo --workdir is a file", ["demo", "--smoke", "--workdir", a_file],
             2, r"^genjax demo: error: --workdir='.*a_file': is a file, not a folder"),
        # genjax eval: --out before the samples are read
        Case("eval --out not .json", ["eval", "--samples", w / "s.npz", "--out", w / "m.txt"],
             2, r"^genjax eval: error: --out='.*m\.txt': must be a \.json file"),
        Case("eval --out is a folder", ["eval", "--samples", w / "s.npz", "--out", json_folder],
             2, r"^genjax eval: error: --out='.*m\.json': is a folder"),
        Case("eval --out under a file", ["eval", "--samples", w / "s.npz", "--out", under_file / "m.json"],
             2, r"^genjax eval: error: --out='.*a_file/sub': cannot be created"),
        # genjax convert: --out before the source weights are read
        Case("convert --out is a file", ["convert", "--model", "dit", src, "--out", a_file],
             2, r"^genjax convert: error: --out='.*a_file': is a file, not a folder"),
        Case("convert --out under a file", ["convert", "--model", "vae", src, "--out", under_file],
             2, r"^genjax convert: error: --out='.*a_file/sub': cannot be created"),
        # genjax data show: --out before the dataset is loaded
        Case("data show --out is a folder", ["data", "show", "moving_mnist", "--out", gif_folder],
             2, r"^genjax data: error: --out='.*preview\.gif': is a folder"),
        Case("data show --out under a file", ["data", "show", "moving_mnist", "--out", under_file / "p.gif"],
             2, r"^genjax data: error: --out='.*a_file/sub': cannot be created"),
        Case("data show --out bad extension", ["data", "show", "moving_mnist", "--out", w / "p.txt"],
             2, r"^genjax data: error: --out='.*p\.txt': must end in one of"),
        # the media API
        Case("write_outputs on a full disk", _full_disk_savez(existing),
             2, r"^--out='.*samples\.npz': cannot write: No space left on device \[Errno 28\] \(needs ~32 bytes\)"),
        Case("write_gif under a file", _media("write_gif", under_file / "v.gif"),
             2, r"^path='.*a_file/sub/v\.gif': cannot write: (Not a directory|File exists)"),
        Case("write_mp4 to a folder", _media("write_mp4", mp4_folder),
             2, r"^path='.*folder\.mp4': is a folder"),
        Case("write_png_grid float pixels", _media("write_png_grid", w / "g.png", np.zeros((1, 4, 4, 1), np.float32)),
             2, r"^images_or_videos\.dtype='float32': must be uint8"),
    ]
