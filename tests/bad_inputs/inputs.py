"""Bad-input catalogue rows: inputs (issue 21): prompts (`genjax sample --prompt`, the byte
tokenizer), input files (`--workdir`, `--init-frame`, `readers.read_image` / `read_video`) and
the folder sources of `genjax data show` (video_folder:PATH, image_folder:PATH).

Every row fails at validation: `genjax sample` rows run against a workdir holding only a
video_dit `config.json` (no checkpoint), so a row that got as far as restoring would fail with
another message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.bad_inputs import Case


def _files(ws: Path) -> dict[str, Path]:
    """The files the rows read: a video_dit run's config.json alone, images that are not, GIFs."""
    from PIL import Image

    from genjax.io import media

    run = ws / "video_run"
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps({
        "model": {"name": "video_dit"}, "task": {"text_length": 32},
        "data": {"image_size": 32, "channels": 1}}))
    (ws / "notes.png").write_text("these are notes, not a PNG")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(ws / "good.png")
    (ws / "truncated.png").write_bytes((ws / "good.png").read_bytes()[:60])
    (ws / "frame.txt").write_text("not an image")
    (ws / "file_workdir").write_text("a file, not a folder")
    short = ws / "short_videos"
    short.mkdir(exist_ok=True)
    media.write_gif(short / "a.gif", np.zeros((4, 8, 8, 3), np.uint8))
    (ws / "no_classes").mkdir(exist_ok=True)
    return {"run": run, "short": short}


def _sample(ws: Path, *extra) -> list[str]:
    return ["sample", "--workdir", ws / "video_run", "--num", "1", "--out", ws / "x.npz", *extra]


def _tokenizer_check_fits(texts, max_length):
    from genjax.models.tokenizer import ByteTokenizer

    return lambda: ByteTokenizer().check_fits(texts, max_length)


def _tokenizer_encode(texts, max_length):
    from genjax.models.tokenizer import ByteTokenizer

    return lambda: ByteTokenizer().encode(texts, max_length)


def _read_image(path):
    from genjax.io import readers

    return lambda: readers.read_image(path)


def _init_frames(path):
    from genjax import sample

    return lambda: sample.init_frames(str(path), 1, 32, 32, 1)


def _model_dir(path):
    from genjax import sample

    return lambda: sample.model_dir(str(path))


def _read_video(path):
    from genjax.io import readers

    return lambda: readers.read_video(path)


def cases(workspace: Path) -> list[Case]:
    ws = workspace
    files = _files(ws)
    long_prompt = "digit 3 moving up and then left and then down"  # 45 bytes; the run reads 30
    return [
        # genjax sample: prompts, checked against the run's task.text_length before restoring.
        Case("sample prompt longer than text_length", _sample(ws, "--prompt", long_prompt), 2,
             r"^genjax sample: error: --prompt\[0\]='digit 3 moving.*': is 45 bytes of UTF-8; the model reads "
             r"at most 30"),
        Case("sample second prompt too long", _sample(ws, "--prompt", "digit 1", "--prompt", "é" * 16), 2,
             r"--prompt\[1\]='é+': is 32 bytes of UTF-8; the model reads at most 30"),
        Case("sample 10k-character prompt", _sample(ws, "--prompt", "x" * 10_000), 2,
             r"--prompt\[0\]='x+\.\.\. \(9952 more characters\)': is 10000 bytes"),
        Case("sample non-UTF-8 prompt byte", _sample(ws, "--prompt", "digit \udcff"), 2,
             r"--prompt\[0\]='digit \\udcff': is not valid UTF-8 text \(character 6"),
        Case("sample empty prompt", _sample(ws, "--prompt", ""), 2, r"--prompt='': must be a non-empty string"),
        Case("sample blank prompt", _sample(ws, "--prompt", "   "), 2, r"--prompt='   ': must be a non-empty string"),
        Case("sample video model without prompt", _sample(ws), 2,
             r"--prompt=None: is required for a text-to-video model"),
        # genjax sample: the workdir.
        Case("sample workdir is a file", ["sample", "--workdir", ws / "file_workdir", "--prompt", "digit 1",
                                          "--out", ws / "x.npz"], 2,
             r"--workdir='.*file_workdir': is a file, not a folder"),
        Case("sample workdir missing", ["sample", "--workdir", ws / "nowhere", "--prompt", "digit 1",
                                        "--out", ws / "x.npz"], 2, r"--workdir='.*nowhere': does not exist"),
        Case("sample workdir without model", ["sample", "--workdir", ws / "no_classes", "--prompt", "digit 1",
                                              "--out", ws / "x.npz"], 2, r"holds no trained model"),
        # genjax sample: --init-frame, read before the model is restored.
        Case("sample init frame not an image", _sample(ws, "--prompt", "digit 1", "--init-frame", ws / "notes.png"),
             2, r"--init-frame='.*notes\.png': cannot be decoded as an image \(not an image format"),
        Case("sample init frame truncated", _sample(ws, "--prompt", "digit 1", "--init-frame", ws / "truncated.png"),
             2, r"--init-frame='.*truncated\.png': cannot be decoded as an image"),
        Case("sample init frame missing", _sample(ws, "--prompt", "digit 1", "--init-frame", ws / "gone.png"), 2,
             r"--init-frame='.*gone\.png': must be an existing image file"),
        Case("sample init frame is a folder", _sample(ws, "--prompt", "digit 1", "--init-frame", ws), 2,
             r"--init-frame='.*': is a folder, not an image file"),
        Case("sample init frame wrong extension", _sample(ws, "--prompt", "digit 1", "--init-frame",
                                                          ws / "frame.txt"), 2,
             r"--init-frame='.*frame\.txt': extension must be one of \.png"),
        # Python API: tokenizer, readers, sample helpers.
        Case("ByteTokenizer.check_fits too long", _tokenizer_check_fits(["digit 1", long_prompt], 32), 2,
             r"^prompts\[1\]='digit 3 moving.*': is 45 bytes of UTF-8; the model reads at most 30"),
        Case("ByteTokenizer.encode lone surrogate", _tokenizer_encode(["ok", "\udcff"], 16), 2,
             r"^texts\[1\]='\\udcff': is not valid UTF-8 text"),
        Case("ByteTokenizer.encode bare str", _tokenizer_encode("digit 1", 16), 2,
             r"^texts='str': must be a non-empty list of str"),
        Case("read_image not an image", _read_image(ws / "notes.png"), 2,
             r"^path='.*notes\.png': cannot be decoded as an image"),
        Case("read_image truncated", _read_image(ws / "truncated.png"), 2,
             r"^path='.*truncated\.png': cannot be decoded as an image"),
        Case("read_video missing", _read_video(ws / "gone.gif"), 2, r"^path='.*gone\.gif': file does not exist"),
        Case("init_frames not an image", _init_frames(ws / "notes.png"), 2,
             r"^--init-frame='.*notes\.png': cannot be decoded as an image"),
        Case("model_dir of a file", _model_dir(ws / "file_workdir"), 2,
             r"^--workdir='.*file_workdir': is a file, not a folder"),
        # genjax data show: folder sources.
        Case("data show video_folder clips longer than every video",
             ["data", "show", f"video_folder:{files['short']}", "--out", ws / "p.png"], 2,
             r"clip_length=16: a clip spans 16 frames .* \(e\.g\. --set clip_length=4\)"),
        Case("data show video_folder clip_length 0",
             ["data", "show", f"video_folder:{files['short']}", "--out", ws / "p.png", "--set", "clip_length=0"], 2,
             r"clip_length=0: must be an int >= 1"),
        Case("data show video_folder missing folder",
             ["data", "show", f"video_folder:{ws / 'nowhere'}", "--out", ws / "p.png"], 2, r"nowhere"),
        Case("data show video_folder without path", ["data", "show", "video_folder:", "--out", ws / "p.png"], 2,
             r"dataset='video_folder:': must be video_folder:PATH"),
        Case("data show video_folder other split",
             ["data", "show", f"video_folder:{files['short']}", "--out", ws / "p.png", "--split", "test"], 2,
             r"split='test': video_folder is one split"),
        Case("data show image_folder without classes",
             ["data", "show", f"image_folder:{ws / 'no_classes'}", "--out", ws / "p.png"], 2,
             r"holds no class folders with images"),
    ]
