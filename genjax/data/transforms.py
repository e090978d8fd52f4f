"""Numpy-only example transforms: [-1, 1] scaling, crops, resize, flips, temporal crops, and the
ADM / DiT ImageNet center crop (`adm_center_crop`).

Array functions take images `(H, W, C)` or videos `(T, H, W, C)` (any leading axes; the spatial
axes are always -3 and -2) and return new arrays without touching their input. Random ones take
a `np.random.Generator`. The classes wrap them as grain `Map` / `RandomMap` transforms over
example dicts: each applies to the pixel keys it names (default "image" and "video") that are
present and passes every other field through. Videos get one crop / flip for all frames.

Size errors (a crop larger than the input, a clip longer than the video) raise
`genjax.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from genjax.errors import check

PIXEL_KEYS = ("image", "video")
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "box": Image.Resampling.BOX}


def _pair(field: str, size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    check(len(pair) == 2 and all(isinstance(s, (int, np.integer)) and s >= 1 for s in pair),
          field, size, "must be a positive int or a (height, width) pair of positive ints")
    return int(pair[0]), int(pair[1])


# ---------------------------------------------------------------------------------------------
# Array functions.


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]: `x / 127.5 - 1` (0 -> -1, 255 -> 1). Any shape."""
    return np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)


def _crop(x: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    return x[..., top:top + h, left:left + w, :]


def _check_crop(x: np.ndarray, h: int, w: int) -> tuple[int, int]:
    check(x.ndim >= 3, "pixels.shape", x.shape, "must be (..., H, W, C)")
    height, width = x.shape[-3], x.shape[-2]
    check(h <= height and w <= width, "crop size", (h, w),
          f"must fit inside the input's (H, W) = {(height, width)}")
    return height, width


def center_crop(x: np.ndarray, size) -> np.ndarray:
    """Crop the central `size` = (h, w) (or int) window of (..., H, W, C); when H - h is odd the
    extra row goes to the bottom (top = (H - h) // 2), same for columns. Raises `UserError` if
    the window is larger than the input."""
    h, w = _pair("size", size)
    height, width = _check_crop(x, h, w)
    return _crop(x, (height - h) // 2, (width - w) // 2, h, w)


def random_crop(x: np.ndarray, size, rng: np.random.Generator) -> np.ndarray:
    """Crop a (h, w) window of (..., H, W, C) with top / left uniform over all valid positions.
    Raises `UserError` if the window is larger than the input."""
    h, w = _pair("size", size)
    height, width = _check_crop(x, h, w)
    top, left = rng.integers(height - h + 1), rng.integers(width - w + 1)
    return _crop(x, int(top), int(left), h, w)


def resize(x: np.ndarray, size, resample: str = "bilinear") -> np.ndarray:
    """Resize (..., H, W, C) to (..., h, w, C) with PIL (`Image.resize`, which antialiases when
    downscaling). uint8 stays uint8 (PIL mode "L"); floats are resized as float32 (mode "F").
    Each channel and frame is resized on its own, which is what PIL does inside RGB images."""
    h, w = _pair("size", size)
    check(resample in _RESAMPLE, "resample", resample, f"must be one of {sorted(_RESAMPLE)}")
    x = np.asarray(x)
    check(x.ndim >= 3, "pixels.shape", x.shape, "must be (..., H, W, C)")
    dtype = np.uint8 if x.dtype == np.uint8 else np.float32
    planes = x.astype(dtype, copy=False).reshape(-1, *x.shape[-3:])
    out = np.empty((planes.shape[0], h, w, x.shape[-1]), dtype)
    for i, plane in enumerate(planes):
        for c in range(x.shape[-1]):
            image = Image.fromarray(np.ascontiguousarray(plane[..., c]))
            out[i, ..., c] = np.asarray(image.resize((w, h), _RESAMPLE[resample]))
    return out.reshape(*x.shape[:-3], h, w, x.shape[-1])


def adm_center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """The ADM / DiT ImageNet preprocessing: uint8 (..., H, W, C) -> uint8 (..., size, size, C).

    1. while min(H, W) >= 2 * size: halve both sides (`side // 2`) with PIL BOX;
    2. resize with PIL BICUBIC so the short side is `size` (each side `round(side * size / min)`,
       Python's round);
    3. crop the central size x size window (top = (H' - size) // 2, left = (W' - size) // 2).
    Upscales small images (step 2 with a scale > 1). Each channel and frame goes through PIL on its
    own (`resize`), which equals resizing an RGB image (tests/data/test_transforms.py).

    Source: `center_crop_arr` of openai/guided-diffusion `guided_diffusion/image_datasets.py`
    (commit 8fb3ad9), used unchanged by facebookresearch/DiT `train.py` for ImageNet 256 x 256.

    Raises `UserError` if `size` is not a positive int, `x` is not uint8 (..., H, W, C) or has an
    empty side.
    """
    check(isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 1,
          "size", size, "must be a positive int (the square output side)")
    x = np.asarray(x)
    check(x.dtype == np.uint8 and x.ndim >= 3 and min(x.shape[-3:-1]) >= 1, "pixels",
          f"{x.dtype}{x.shape}", "must be uint8 (..., H, W, C) with H, W >= 1")
    h, w = x.shape[-3], x.shape[-2]
    while min(h, w) >= 2 * size:
        h, w = h // 2, w // 2
        x = resize(x, (h, w), "box")
    scale = size / min(h, w)
    h, w = round(h * scale), round(w * scale)
    x = resize(x, (h, w), "bicubic")
    return _crop(x, (h - size) // 2, (w - size) // 2, size, size)


def horizontal_flip(x: np.ndarray) -> np.ndarray:
    """Mirror (..., H, W, C) left-right."""
    return x[..., ::-1, :]


def grayscale_to_rgb(x: np.ndarray) -> np.ndarray:
    """(..., 1) -> (..., 3) by repeating the channel; 3-channel input is returned unchanged."""
    check(x.shape[-1] in (1, 3), "pixels.shape", x.shape, "must have 1 or 3 channels")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def resize_and_crop(frames: np.ndarray, size: int, crop: str | None,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Resize frames so the shorter side is `size` (Pillow bicubic, antialiased when shrinking),
    then cut a `size` x `size` square: the folder and TFDS video sources' `size` / `crop`.

    Args:
      frames: uint8 `(T, H, W, C)`, C = 1 or 3 (an image: `image[None]`).
      size: target shorter side in pixels.
      crop: "center", "random" (offsets drawn from `rng`) or None (keep the resized frame).
      rng: numpy Generator, required for crop="random".

    Returns:
      uint8 `(T, size, size, C)`, or `(T, H', W', C)` with min(H', W') = size when crop is None.
    """
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f)
                                      .resize((nw, nh), Image.Resampling.BICUBIC)).reshape(nh, nw, -1)
                           for f in frames])
    if crop is None:
        return frames
    if crop == "center":
        y, x = (nh - size) // 2, (nw - size) // 2
    else:
        y, x = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return frames[:, y : y + size, x : x + size]


CLIP_STARTS = ("fixed", "random")  # data.clip_start / the video sources' clip_start


def fps_stride(native_fps: float, fps: float) -> int:
    """The frame stride that samples a video of `native_fps` at about `fps` frames per second:
    `max(1, round(native_fps / fps))` (a video slower than `fps` keeps every frame)."""
    return max(1, round(float(native_fps) / float(fps)))


def clip_start(num_frames: int, span: int, default: int, rng: np.random.Generator | None) -> int:
    """The first frame of a clip spanning `span` of `num_frames` frames: `default` without `rng`
    (clip_start "fixed"), else uniform over the `num_frames - span + 1` starts that fit ("random")."""
    return default if rng is None else int(rng.integers(num_frames - span + 1))


def temporal_crop(video: np.ndarray, num_frames: int, *, stride: int = 1, start: int = 0) -> np.ndarray:
    """Frames `start, start + stride, ..., start + (num_frames - 1) * stride` of (T, ...).

    Raises `UserError` if num_frames or stride < 1 or the clip runs past the last frame.
    """
    check(num_frames >= 1, "num_frames", num_frames, "must be >= 1")
    check(stride >= 1, "stride", stride, "must be >= 1")
    span = (num_frames - 1) * stride + 1
    check(0 <= start and start + span <= video.shape[0], "clip", (start, num_frames, stride),
          f"(start, num_frames, stride) spans {span} frames from {start}; "
          f"the video has {video.shape[0]}")
    return video[start:start + span:stride]


def random_temporal_crop(video: np.ndarray, num_frames: int, rng: np.random.Generator, *,
                         stride: int = 1) -> np.ndarray:
    """`temporal_crop` with `start` uniform over all clips that fit. Same errors."""
    check(num_frames >= 1 and stride >= 1, "(num_frames, stride)", (num_frames, stride),
          "must both be >= 1")
    span = (num_frames - 1) * stride + 1
    check(span <= video.shape[0], "clip", (num_frames, stride),
          f"(num_frames, stride) spans {span} frames; the video has {video.shape[0]}")
    return temporal_crop(video, num_frames, stride=stride, start=int(rng.integers(video.shape[0] - span + 1)))


# ---------------------------------------------------------------------------------------------
# grain transforms over example dicts.


def _apply(example: dict[str, Any], keys, fn) -> dict[str, Any]:
    return {k: fn(v) if k in keys else v for k, v in example.items()}


@dataclasses.dataclass(frozen=True)
class ToFloat(grain.transforms.Map):
    """uint8 [0, 255] -> float32 [-1, 1] (`to_float`) on `keys`."""
    keys: tuple[str, ...] = PIXEL_KEYS

    def map(self, example):
        return _apply(example, self.keys, to_float)


def budget_size(height: int, width: int, *, max_area: int, multiple: int) -> tuple[int, int]:
    """The size `(h, w)` a `height x width` frame is resized to so that h * w <= max_area: the
    aspect ratio kept (up to rounding each side down to a multiple of `multiple`, at least one
    multiple, so the area exceeds max_area only when max_area < multiple^2), never upscaled. NaViT's aspect-preserving resize to a token budget (Dehghani et
    al. 2023, sec. 2.1 and 3.1) instead of a square crop.

    Raises:
      UserError: a side, max_area or multiple < 1.
    """
    for field, value in (("height", height), ("width", width), ("max_area", max_area), ("multiple", multiple)):
        check(isinstance(value, (int, np.integer)) and value >= 1, field, value, "must be an int >= 1")
    scale = min(1.0, (max_area / (height * width)) ** 0.5)
    h, w = (max(multiple, int(side * scale) // multiple * multiple) for side in (height, width))
    if h * w > max_area:  # a very thin frame: its short side was raised to one multiple, trim the long one
        long = max(multiple, max_area // multiple // multiple * multiple)
        h, w = (multiple, min(w, long)) if h == multiple else (min(h, long), multiple)
    return h, w


@dataclasses.dataclass(frozen=True)
class FitArea(grain.transforms.Map):
    """Resize `keys` (..., H, W, C) to `budget_size(H, W, max_area=, multiple=)` (bilinear, PIL);
    unchanged when that is already its size."""
    max_area: int
    multiple: int
    keys: tuple[str, ...] = PIXEL_KEYS

    def map(self, example):
        def fit(x):
            size = budget_size(x.shape[-3], x.shape[-2], max_area=self.max_area, multiple=self.multiple)
            return x if size == x.shape[-3:-1] else resize(x, size)
        return _apply(example, self.keys, fit)


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
    """`resize` to `size` (int or (h, w)) on `keys`."""
    size: Any
    resample: str = "bilinear"
    keys: tuple[str, ...] = PIXEL_KEYS

    def __post_init__(self):
        _pair("size", self.size)
        check(self.resample in _RESAMPLE, "resample", self.resample, f"must be one of {sorted(_RESAMPLE)}")

    def map(self, example):
        return _apply(example, self.keys, lambda x: resize(x, self.size, self.resample))


@dataclasses.dataclass(frozen=True)
class CenterCrop(grain.transforms.Map):
    """`center_crop` to `size` (int or (h, w)) on `keys`."""
    size: Any
    keys: tuple[str, ...] = PIXEL_KEYS

    def __post_init__(self):
        _pair("size", self.size)

    def map(self, example):
        return _apply(example, self.keys, lambda x: center_crop(x, self.size))


@dataclasses.dataclass(frozen=True)
class AdmCenterCrop(grain.transforms.Map):
    """`adm_center_crop` to `size` x `size` on `keys` (the ADM / DiT ImageNet crop)."""
    size: int
    keys: tuple[str, ...] = PIXEL_KEYS

    def __post_init__(self):
        check(isinstance(self.size, (int, np.integer)) and not isinstance(self.size, bool)
              and self.size >= 1, "size", self.size, "must be a positive int (the square output side)")

    def map(self, example):
        return _apply(example, self.keys, lambda x: adm_center_crop(x, self.size))


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """`random_crop` to `size` (int or (h, w)) on `keys`; one window for a whole video."""
    size: Any
    keys: tuple[str, ...] = PIXEL_KEYS

    def __post_init__(self):
        _pair("size", self.size)

    def random_map(self, example, rng):
        return _apply(example, self.keys, lambda x: random_crop(x, self.size, rng))


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
    """`horizontal_flip` with probability `prob` on `keys` (all keys flip together)."""
    prob: float = 0.5
    keys: tuple[str, ...] = PIXEL_KEYS

    def __post_init__(self):
        check(0.0 <= self.prob <= 1.0, "prob", self.prob, "must be in [0, 1]")

    def random_map(self, example, rng):
        return _apply(example, self.keys, horizontal_flip) if rng.random() < self.prob else example


@dataclasses.dataclass(frozen=True)
class TemporalCrop(grain.transforms.RandomMap):
    """A `num_frames` clip with `stride` from `key`: a random start (`random_temporal_crop`), or
    the first clip when `random` is False (`temporal_crop`)."""
    num_frames: int
    stride: int = 1
    random: bool = True
    key: str = "video"

    def __post_init__(self):
        check(self.num_frames >= 1 and self.stride >= 1, "(num_frames, stride)",
              (self.num_frames, self.stride), "must both be >= 1")

    def random_map(self, example, rng):
        if self.random:
            fn = lambda v: random_temporal_crop(v, self.num_frames, rng, stride=self.stride)
        else:
            fn = lambda v: temporal_crop(v, self.num_frames, stride=self.stride)
        return _apply(example, (self.key,), fn)


@dataclasses.dataclass(frozen=True)
class GrayscaleToRGB(grain.transforms.Map):
    """`grayscale_to_rgb` on `keys`."""
    keys: tuple[str, ...] = PIXEL_KEYS

    def map(self, example):
        return _apply(example, self.keys, grayscale_to_rgb)
