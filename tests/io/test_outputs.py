"""Outputs and file-system faults (issue 21, defects 1, 2, 7 captions, 8, 10 metrics): every file is
written to a temporary name and renamed into place, a failed write or encode is one line naming
the path, and the previous file survives."""

import errno
import json
import os
import subprocess
import time

import numpy as np
import pytest

from genjax import cli
from genjax.errors import UserError
from genjax.io import fs, media

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _videos(value=0, n=2):
    return np.full((n, 3, 8, 8, 1), value, np.uint8)


def _one_line(e) -> str:
    lines = str(e.value).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def full_disk_ffmpeg(monkeypatch):
    """ffmpeg runs out of disk partway: it writes part of the file and exits 1 (imageio-ffmpeg's
    writer ignored that exit status: a 0-byte MP4 and exit 0)."""
    def run(cmd, **kwargs):
        with open(cmd[-1], "wb") as f:
            f.write(b"GIF89a partial")
        return subprocess.CompletedProcess(cmd, 1, b"", b"av_interleaved_write_frame(): No space left on device\n")
    monkeypatch.setattr(subprocess, "run", run)


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_failed_encode_is_one_line_and_keeps_the_old_file(tmp_path, ext, full_disk_ffmpeg, monkeypatch):
    path = tmp_path / f"v{ext}"
    path.write_bytes(b"previous good file")
    write = media.write_gif if ext == ".gif" else media.write_mp4
    with pytest.raises(UserError) as e:
        write(path, _videos())
    line = _one_line(e)
    assert repr(str(path)) in line and "No space left on device" in line
    assert path.read_bytes() == b"previous good file"
    assert os.listdir(tmp_path) == [path.name]


def test_sample_outputs_all_or_nothing(tmp_path, monkeypatch):
    """`np.savez` wrote in place, so a full disk destroyed the previous samples.npz; now a failure
    in any of the three files leaves all three as they were."""
    out = str(tmp_path / "samples.npz")
    media.write_outputs(out, _videos(7), ["digit 1", "digit 2"])
    before = {p: open(p, "rb").read() for p in media.output_paths(out, video=True)}

    def savez(f, **arrays):  # a full disk partway through the file
        f.write(b"PK\x03\x04 partial")
        raise ENOSPC
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(UserError) as e:
        media.write_outputs(out, _videos(9), ["digit 3", "digit 4"])
    line = _one_line(e)
    assert line.startswith(f"--out={out!r}: cannot write: No space left on device") and "bytes" in line
    assert {p: open(p, "rb").read() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in before)


def test_sample_outputs_failed_mp4_changes_nothing(tmp_path, full_disk_ffmpeg):
    out = str(tmp_path / "s.npz")
    with pytest.raises(UserError, match=r"path='.*s\.gif': ffmpeg failed \(exit status 1\)"):
        media.write_outputs(out, _videos(), ["a", "b"])
    assert os.listdir(tmp_path) == []


def test_long_caption_is_linear(tmp_path):
    """A 10,000-character caption took over 120 s (the cut removed one character per text width
    measurement)."""
    start = time.perf_counter()
    media.write_png_grid(tmp_path / "c.png", np.zeros((1, 8, 8, 1), np.uint8), captions=["x" * 10_000])
    assert time.perf_counter() - start < 2


def test_caption_cut_and_non_utf8(tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("L", (8, 8))), ImageFont.load_default()
    cut = media._fit_text(draw, "digit 3 " * 50, font, 124)
    assert cut.endswith("..") and draw.textlength(cut, font=font) <= 124
    assert media._fit_text(draw, "short", font, 124) == "short"
    media.write_gif(tmp_path / "s.gif", _videos(n=1), captions=["bad \udcff byte"])  # no UnicodeEncodeError


def test_check_writable_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        fs.check_writable_dir(tmp_path / "file", "--workdir")
    with pytest.raises(UserError, match="cannot be created: .* is a file"):
        fs.check_writable_dir(tmp_path / "file" / "sub", "--workdir")
    fs.check_writable_dir(tmp_path / "new" / "deeper", "--workdir")  # creatable


def test_cli_prints_os_errors_as_one_line(tmp_path, monkeypatch, capsys):
    """Any file-system OSError that escapes a command is one line and exit 2, not a traceback."""
    from genjax.data import preview

    def show(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "x.gif"))
    monkeypatch.setattr(preview, "show", show)
    assert cli.main(["data", "show", "moving_mnist", "--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"genjax data: error: {str(tmp_path / 'x.gif')!r}: Read-only file system [Errno 30]"]


def test_sample_refuses_existing_out_before_restoring(tmp_path, monkeypatch, capsys):
    """`sample --out runs/demo/samples.npz` replaced the demo's samples, and --out was checked only
    after generating."""
    from genjax import sample

    def restore(*args, **kwargs):
        raise AssertionError("restored before checking --out")
    monkeypatch.setattr(sample, "restore", restore)
    out = tmp_path / "samples.npz"
    out.write_bytes(b"96 videos")
    argv = ["sample", "--workdir", str(tmp_path), "--prompt", "digit 1", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"96 videos"


def test_metrics_nonfinite_is_null_and_flagged():
    from genjax.train import metrics_log

    line = metrics_log.json_record({"step": 3, "loss": float("nan"), "grad_norm": np.float32("inf"), "lr": 0.1})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
        "step": 3, "loss": None, "grad_norm": None, "lr": 0.1, "nonfinite": ["loss", "grad_norm"]}
