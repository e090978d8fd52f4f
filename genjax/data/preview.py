"""`genjax data show NAME --out FILE`: write a preview of real examples of a dataset.

Videos go to a GIF / MP4 grid animation or a PNG contact sheet (one row of frames per video),
images to a PNG grid, each tile captioned with the example's caption (`genjax.io.media`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import numpy as np

from genjax.data.sources import make_source
from genjax.errors import check
from genjax.io import fs, media

_EXTENSIONS = (".gif", ".mp4", ".png")


def _value(text: str) -> Any:
    """'20' -> 20, '2.5' -> 2.5, 'true' / 'false' -> bool, 'none' -> None, else the str."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`["num_frames=20", "speed=2,4", "crop=center"]` -> `{"num_frames": 20, "speed": (2, 4),
    "crop": "center"}`: ints, floats, true / false and none are converted; a comma-separated
    list of numbers becomes a tuple (any other text, commas included, stays a str).

    Raises `UserError` for an item without "=" or with an empty key.
    """
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        check(sep == "=" and key.strip() != "", "--set", pair, "must be KEY=VALUE")
        parts = [_value(p) for p in text.split(",")]
        numeric = len(parts) > 1 and all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                         for p in parts)
        options[key.strip()] = tuple(parts) if numeric else _value(text)
    return options


def show(name: str, out: str, *, num: int = 16, split: str = "train", data_dir: str | None = None,
         seed: int = 0, options: dict[str, Any] | None = None, fps: float = 8) -> str:
    """Write `num` examples of dataset `name`, drawn without replacement with
    `np.random.default_rng(seed)`, to `out` (.gif / .mp4 for videos, .png for images or video
    contact sheets), captioned. Returns a one-line summary of what was written.

    Raises `UserError` for a bad extension, an `out` that is a folder or cannot be written
    (checked first; a failed write names it and leaves no partial file), num < 1, an unknown dataset or option, images asked
    for as .gif / .mp4, or examples of different shapes (pass a size option to the source).
    """
    ext = os.path.splitext(out)[1].lower()
    check(ext in _EXTENSIONS, "--out", out, f"must end in one of {_EXTENSIONS}")
    check(num >= 1, "--num", num, "must be >= 1")
    fs.check_new_file(out, "--out", overwrite=True)  # a folder, a read-only disk: before loading
    source = make_source(name, split=split, data_dir=data_dir, **(options or {}))
    count = min(num, len(source))
    picks = np.random.default_rng(seed).choice(len(source), size=count, replace=False)
    examples = [source[int(i)] for i in picks]
    key = "video" if "video" in examples[0] else "image"
    shapes = sorted({ex[key].shape for ex in examples})
    check(len(shapes) == 1, "dataset", name,
          f"examples have different shapes {shapes[:3]}; set a size option (e.g. --set size=64)")
    pixels = np.stack([ex[key] for ex in examples])
    captions = [str(ex.get("caption", "")) for ex in examples]
    if ext == ".png":
        media.write_png_grid(out, pixels, captions=captions)
    else:
        check(key == "video", "--out", out, f"{name} holds images; preview images as .png")
        (media.write_gif if ext == ".gif" else media.write_mp4)(out, pixels, fps=fps, captions=captions)
    shape = "x".join(str(s) for s in pixels.shape[1:])
    return f"wrote {out}: {count} {key}s ({shape} uint8) from {name} split={split} seed={seed}"


def main(args: argparse.Namespace) -> int:
    """Entry point of `genjax data show` (parser in `genjax.cli`)."""
    print(show(args.name, args.out, num=args.num, split=args.split, data_dir=args.data_dir,
               seed=args.seed, options=parse_options(args.set)))
    return 0
