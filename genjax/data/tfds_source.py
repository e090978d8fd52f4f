"""Any TFDS dataset by name, through array_record `tfds.data_source` (no TensorFlow needed for
image datasets; see `TfdsSource` for video features).

`pixel_feature(name, data_dir)` reads only the dataset's feature spec (its builder's info), so
`genjax.data.recipes.is_video` can tell a video dataset (a uint8 feature of rank 4) from an
image dataset without reading data.
"""

from __future__ import annotations

import operator
import os
import re
from typing import Any

import numpy as np

from genjax.data import transforms
from genjax.errors import UserError, check

_PIXEL_KEY_PREFERENCE = ("video", "image")


def _builder(name: str, data_dir: str | None):
    check(data_dir is None or os.path.isdir(data_dir), "data_dir", data_dir,
          "must be an existing folder holding prepared TFDS datasets")
    import tensorflow_datasets as tfds  # heavy; only when a TFDS source is asked for

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"dataset={name!r}: must be moving_mnist, mnist_embedded, "
                        "video_folder:PATH, image_folder:PATH or a TFDS dataset name, optionally "
                        "tfds:NAME (see `tfds.list_builders()`)") from None
    except ModuleNotFoundError as e:  # e.g. tfds.features.Video (ucf101, moving_mnist) imports TensorFlow
        found = re.search(r"No module named '([^']+)'", str(e))  # TFDS re-raises it without .name
        module = found.group(1) if found else e.name
        raise UserError(f"dataset={name!r}: TFDS needs the module {module!r} to describe this dataset's "
                        f"features (pip install tensorflow-cpu)") from None


def pixel_feature(name: str, data_dir: str | None = None) -> tuple[str, tuple]:
    """The pixel feature of TFDS dataset `name`: `(feature key, shape)`, the feature named "video"
    or "image" if there is one, else the first uint8 feature of rank 3 (image, (H, W, C)) or 4
    (video, (T, H, W, C); T None for variable lengths). Reads the builder's info only, no data.

    Raises `UserError` for: an unknown name; a `data_dir` that is not a folder; a dataset whose
    features need a missing module (TFDS's `Video` feature needs TensorFlow); a dataset with no
    uint8 image / video feature.
    """
    return _pixel(_builder(name, data_dir).info.features, name)


def _pixel(features, name: str) -> tuple[str, tuple]:
    shapes, dtypes = features.shape, features.np_dtype
    pixel_keys = [k for k in shapes if np.dtype(dtypes[k]) == np.uint8
                  and isinstance(shapes[k], tuple) and len(shapes[k]) in (3, 4)]
    check(bool(pixel_keys), "dataset", name, "has no uint8 image (H, W, C) or video (T, H, W, C) feature")
    key = ([k for k in _PIXEL_KEY_PREFERENCE if k in pixel_keys] or pixel_keys)[0]
    return key, tuple(shapes[key])


class TfdsSource:
    """Any TFDS dataset prepared in array_record format, read with `tfds.data_source`.

    Examples are re-keyed into the genjax convention: the dataset's pixel feature (`pixel_feature`)
    comes out as `"image"` uint8 (H, W, C) or `"video"` uint8 (T, H, W, C); a `ClassLabel`
    feature named "label" comes out as `"label"` int32 () with `"caption"` its class name
    (underscores replaced by spaces); without one, the caption is the dataset name. Other
    features are dropped.

    Videos (as `folders.VideoFolderSource` does for files): with `clip_length`, one clip of
    `clip_length` frames every `frame_stride` per example, starting at frame 0 (clip_start
    "fixed") or, in `read(i, rng)` with clip_start "random", at a start drawn uniformly over the
    starts that fit (`transforms.clip_start`; `__getitem__(i)` is `read(i, None)`, frame 0). A
    video shorter than the clip raises `UserError` naming it (the pipeline then skips it, as a
    folder skips videos too short for any clip). With `size`, the shorter side is resized to
    `size` and a `size` x `size` square cut (`transforms.resize_and_crop`, crop "center" or
    "random" with offsets a pure function of (seed, i)). TFDS records no frame rate, so there is
    no `fps`. TFDS's own `Video` feature (ucf101, moving_mnist, kinetics) needs TensorFlow
    installed to be described at all; `Sequence(Image)` videos (bair_robot_pushing_small) do not.

    `download=True` lets TFDS download and prepare the data (`tfds.data_source` semantics);
    the default reads only what is already in `data_dir` (TFDS's default folder when None).

    Attributes: `pixel_key`, `out_key` ("image" | "video"), `shape` (the feature's shape),
    `channels` (its C).

    Raises `UserError` for: what `pixel_feature` raises; clip options on an image dataset, a
    clip_length / frame_stride < 1, an unknown clip_start or crop, a clip longer than a
    fixed-length dataset's videos; data that TFDS cannot open (not prepared, unknown split).
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
                 download: bool = False, clip_length: int | None = None, frame_stride: int = 1,
                 clip_start: str = "fixed", size: int | None = None, crop: str | None = "center",
                 seed: int = 0):
        import tensorflow_datasets as tfds

        features = _builder(name, data_dir).info.features
        self.pixel_key, self.shape = _pixel(features, name)
        self.out_key = "video" if len(self.shape) == 4 else "image"
        self.channels = self.shape[-1]
        clips = (clip_length, frame_stride, clip_start, size) != (None, 1, "fixed", None)
        check(self.out_key == "video" or not clips, "dataset", name,
              "is an image dataset; clip_length, frame_stride, clip_start and size are video options")
        check(clip_length is None or (isinstance(clip_length, (int, np.integer)) and clip_length >= 1),
              "clip_length", clip_length, "must be None or an int >= 1")
        check(isinstance(frame_stride, (int, np.integer)) and frame_stride >= 1, "frame_stride", frame_stride,
              "must be an int >= 1")
        check(clip_start in transforms.CLIP_STARTS, "clip_start", clip_start, f"must be one of {transforms.CLIP_STARTS}")
        check(size is None or (isinstance(size, (int, np.integer)) and size >= 1), "size", size,
              "must be None or an int >= 1")
        check(crop in ("center", "random", None), "crop", crop, "must be 'center', 'random' or None")
        self.clip_length, self.frame_stride, self.clip_start = clip_length, int(frame_stride), clip_start
        self.size, self.crop, self.seed = size, crop, int(seed)
        self.span = None if clip_length is None else (clip_length - 1) * self.frame_stride + 1
        length = self.shape[0] if self.out_key == "video" else None
        check(self.span is None or length is None or self.span <= length, "clip_length", clip_length,
              f"a clip spans {self.span} frames at frame_stride={frame_stride}, longer than {name}'s "
              f"{length}-frame videos")
        label = features["label"] if "label" in features.shape else None
        names = getattr(label, "names", None)
        self.class_names = [n.replace("_", " ") for n in names] if names else None
        try:
            self.data = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        except (ValueError, KeyError, FileNotFoundError, AssertionError, NotImplementedError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"dataset={name!r} split={split!r}: TFDS cannot open it ({first_line}); "
                            "prepare it with `tfds build --file_format=array_record` or pass "
                            "download=True") from None
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read(i, None)

    def read(self, i: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """Example `i`, its clip's start drawn by `rng` when clip_start is "random" (see the class)."""
        i = operator.index(i)
        example = self.data[i]
        pixels = np.asarray(example[self.pixel_key], np.uint8)
        if self.span is not None:
            check(self.span <= len(pixels), "clip_length", self.clip_length,
                  f"example {i} of {self.name} has {len(pixels)} frames, fewer than a clip's {self.span} "
                  f"(frame_stride={self.frame_stride})")
            start = transforms.clip_start(len(pixels), self.span, 0, rng if self.clip_start == "random" else None)
            pixels = transforms.temporal_crop(pixels, self.clip_length, stride=self.frame_stride, start=start)
        if self.size is not None:
            crop_rng = np.random.default_rng([self.seed, i]) if self.crop == "random" else None
            pixels = transforms.resize_and_crop(pixels, self.size, self.crop, crop_rng)
        out: dict[str, Any] = {self.out_key: pixels}
        if self.class_names is not None:
            label = np.int32(example["label"])
            out["label"] = label
            out["caption"] = self.class_names[label]
        else:
            out["caption"] = self.name
        return out

    def __repr__(self) -> str:
        clip = "" if self.span is None else (f", clip_length={self.clip_length}, frame_stride={self.frame_stride}, "
                                             f"clip_start={self.clip_start!r}")
        size = "" if self.size is None else f", size={self.size}, crop={self.crop!r}"
        return f"TfdsSource({self.name!r}, split={self.split!r}{clip}{size}, len={len(self)})"
