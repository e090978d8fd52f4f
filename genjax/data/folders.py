"""grain random-access sources over folders of video files and class-labelled image files.

`VideoFolderSource` indexes fixed-length clips of every video under a folder;
`ImageFolderSource` reads the torchvision ImageFolder layout (`root/class_name/xxx.png`). Both
are grain `RandomAccessDataSource`s (`__len__`, `__getitem__`, `__repr__`, picklable) that
return uint8 numpy arrays; `genjax.data.pipeline` shuffles, shards and batches them.

A file that cannot be read at construction is skipped, never silently: a `warnings.warn` names
it, `num_skipped` / `skipped_files` record it and one summary line is printed. A file that fails
only later, in `__getitem__`, raises `UserError` naming the file and the clip instead of
returning a wrong example.
"""

from __future__ import annotations

import operator
import os
import warnings
from typing import Sequence

import numpy as np

from genjax.data import transforms
from genjax.errors import UserError, check
from genjax.io import media, readers

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".avi", ".mov")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _check_folder(path) -> str:
    path = os.fspath(path)
    check(os.path.isdir(path), "path", path, "must be an existing folder")
    return path


def _scan(root: str, extensions: Sequence[str]) -> list[str]:
    """Files under `root` (recursive, hidden entries skipped) with one of `extensions`, sorted by
    their path relative to `root` so the order does not depend on the file system."""
    extensions = tuple(e.lower() for e in extensions)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return [os.path.join(root, rel) for rel in sorted(found)]


def _summary(err: BaseException) -> str:
    """One line for an error; ffmpeg puts its diagnosis on the last line of a long log."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _skip(owner: str, path: str, err: BaseException, skipped: list[str]) -> None:
    warnings.warn(f"{owner}: skipping unreadable file {path} ({_summary(err)})", stacklevel=3)
    skipped.append(path)


def _report_skipped(owner: str, root: str, skipped: list[str], total: int) -> None:
    if skipped:
        names = ", ".join(os.path.relpath(p, root) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"{owner}: skipped {len(skipped)} of {total} files under {root} as unreadable: {names}{more}")


CAPTION_FILES = ("captions.jsonl", "captions.csv")


def _read_captions(file: str | None, root: str, videos: Sequence[str]) -> dict[str, str]:
    """{video path: caption} from a sidecar file (see `VideoFolderSource`); {} without one."""
    import csv
    import json

    if file is None:
        return {}
    check(os.path.isfile(file) and file.endswith((".jsonl", ".csv")), "captions", file,
          "must be an existing .jsonl or .csv file")
    rows = []
    with open(file, encoding="utf-8", newline="") as f:
        if file.endswith(".csv"):
            reader = csv.DictReader(f)
            check(set(reader.fieldnames or ()) >= {"path", "caption"}, "captions", file,
                  f"must have a 'path,caption' header (found {reader.fieldnames})")
            rows = [(i + 2, r) for i, r in enumerate(reader)]
        else:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise UserError(f"captions={file!r}: line {i}: not JSON ({e.msg})") from None
    out = {}
    for line, row in rows:
        ok = isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("caption"), str)
        check(ok, "captions", file, f"line {line} must give a string 'path' and 'caption'")
        out[os.path.normpath(os.path.join(root, row["path"]))] = row["caption"]
    missing = [p for p in videos if os.path.normpath(p) not in out]
    check(not missing, "captions", file, f"has no caption for {len(missing)} of {len(videos)} videos, "
          f"e.g. {os.path.relpath(missing[0], root) if missing else ''!r}")
    return {p: out[os.path.normpath(p)] for p in videos}


def _check_size(size) -> None:
    check(
        size is None or (isinstance(size, (int, np.integer)) and size >= 1),
        "size",
        size,
        "must be None or an int >= 1",
    )


DEFAULT_CLIP_LENGTH = 16


class VideoFolderSource:
    """Clips of `clip_length` frames from every video under a folder (recursive).

    At construction the folder is scanned (files sorted by relative path) and each file's frame
    count is read with `genjax.io.readers.count_frames` (ffmpeg via imageio-ffmpeg; Pillow for GIF).
    A video with n frames gives the non-overlapping clips starting at 0, span, 2 * span, ...
    (span = (clip_length - 1) * frame_stride + 1) that fit in n frames, so the clip index
    (video, start frame) is a deterministic function of the folder's contents. `clips_per_video=k`
    keeps k of a video's clips, evenly spaced (rounded `linspace` over its clips). With `fps`, the
    stride is per video, `transforms.fps_stride(its frame rate, fps)` (`readers.frame_rate`).

    `read(i, rng)` is clip i with `clip_start="random"`: its start drawn by `rng` uniformly over
    every start that fits in its video (`transforms.clip_start`; the pipeline passes a per-read
    generator of its seed and the stream position, so each epoch draws again, reproducibly); the
    number of clips is unchanged. `__getitem__(i)` is `read(i, None)`, the clip at its indexed start.
    A read decodes only that clip's frames (ffmpeg seeks to the clip; GIF iterates),
    optionally resizes the shorter side to `size` and crops a `size` x `size` square, and returns
    `{"video": uint8 (clip_length, H, W, 3), "caption": str, "path": str}`; the caption is the
    video's line in the sidecar captions file, or its file stem when there is none. The random crop
    offset is a pure function of (seed, i): the same clip gets the same crop every epoch and in
    every worker.

    Args:
      path: the folder.
      clip_length: frames per clip, >= 1 (default `DEFAULT_CLIP_LENGTH` = 16, Moving MNIST's
        clip length, so `genjax data show video_folder:PATH` works without options).
      frame_stride: step between the clip's frames in the source video, >= 1.
      fps: target frames per second (> 0) instead of `frame_stride`, which must then stay 1.
      clip_start: "fixed" (the indexed starts) or "random" (drawn at each `read`).
      size: shorter side after resizing, or None to keep the native size (no crop either).
      crop: "center", "random" or None (resize only; clips of different aspect ratios then
        differ in shape). Used only when `size` is given.
      clips_per_video: "all" or an int >= 1.
      seed: seed of the random crop.
      extensions: file name endings that count as videos (case-insensitive), a subset of
        `genjax.io.media.VIDEO_EXTENSIONS`.
      captions: a sidecar file of captions, one line per video: JSON Lines `{"path": ..., "caption":
        ...}` (.jsonl) or CSV `path,caption` with that header (.csv), paths relative to the folder;
        default `captions.jsonl` or `captions.csv` in the folder if one exists, else the file stems.
        Every readable video must have a caption.

    Attributes:
      videos: list of (path, num_frames) of the readable videos, in index order.
      num_skipped, skipped_files: the unreadable files that were skipped.

    Raises:
      UserError: a bad argument, a missing folder, a folder without (readable) videos, a clip
        longer than every video, a captions file that cannot be parsed or lacks a video's caption
        (naming the first); all before any clip is decoded. `__getitem__` raises UserError
        naming the file when a clip cannot be decoded.
    """

    def __init__(
        self,
        path,
        *,
        clip_length: int = DEFAULT_CLIP_LENGTH,
        frame_stride: int = 1,
        fps: float | None = None,
        clip_start: str = "fixed",
        size: int | None = None,
        crop: str | None = "center",
        clips_per_video: str | int = "all",
        seed: int = 0,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        captions: str | None = None,
    ):
        check(isinstance(clip_length, (int, np.integer)) and clip_length >= 1, "clip_length", clip_length, "must be an int >= 1")
        check(isinstance(frame_stride, (int, np.integer)) and frame_stride >= 1, "frame_stride", frame_stride, "must be an int >= 1")
        check(fps is None or (isinstance(fps, (int, float)) and fps > 0), "fps", fps, "must be None or a number > 0")
        check(fps is None or frame_stride == 1, "fps", fps, f"and frame_stride={frame_stride} are exclusive: "
              "the stride follows from each video's frame rate")
        check(clip_start in transforms.CLIP_STARTS, "clip_start", clip_start, f"must be one of {transforms.CLIP_STARTS}")
        _check_size(size)
        check(crop in ("center", "random", None), "crop", crop, "must be 'center', 'random' or None")
        check(
            clips_per_video == "all" or (isinstance(clips_per_video, (int, np.integer)) and clips_per_video >= 1),
            "clips_per_video",
            clips_per_video,
            "must be 'all' or an int >= 1",
        )
        check(isinstance(seed, (int, np.integer)), "seed", seed, "must be an int")
        check(
            len(extensions) > 0 and all(e.lower() in media.VIDEO_EXTENSIONS for e in extensions),
            "extensions",
            tuple(extensions),
            f"must be a non-empty subset of {media.VIDEO_EXTENSIONS}",
        )
        self.path = _check_folder(path)
        self.clip_length, self.frame_stride = int(clip_length), int(frame_stride)
        self.size, self.crop, self.clips_per_video, self.seed = size, crop, clips_per_video, int(seed)
        self.fps, self.clip_start = fps, clip_start
        self.span = (self.clip_length - 1) * self.frame_stride + 1

        files = _scan(self.path, extensions)
        check(bool(files), "path", self.path, f"holds no video files ({', '.join(extensions)})")
        self.videos: list[tuple[str, int]] = []
        self.skipped_files: list[str] = []
        self.strides: list[int] = []  # per video: frame_stride, or from its frame rate with fps
        for f in files:
            try:
                stride = self.frame_stride if fps is None else transforms.fps_stride(readers.frame_rate(f), fps)
                self.videos.append((f, readers.count_frames(f)))
                self.strides.append(stride)
            except Exception as err:  # a corrupt file must not stop the scan  # noqa: BLE001
                _skip("VideoFolderSource", f, err, self.skipped_files)
        self.num_skipped = len(self.skipped_files)
        _report_skipped("VideoFolderSource", self.path, self.skipped_files, len(files))
        check(bool(self.videos), "path", self.path, f"none of its {len(files)} video files could be read")
        spans = [(self.clip_length - 1) * stride + 1 for stride in self.strides]
        room, longest, longest_path, stride = max((n - span, n, p, st) for (p, n), span, st in
                                                  zip(self.videos, spans, self.strides))
        rate = f"frame_stride={frame_stride}" if fps is None else f"fps={fps} (frame stride {stride})"
        check(
            room >= 0,
            "clip_length",
            clip_length,
            f"a clip spans {(self.clip_length - 1) * stride + 1} frames at {rate}, longer than every video "
            f"(longest: {longest} frames, {longest_path}); ask for fewer (e.g. --set clip_length={(longest - 1) // stride + 1})",
        )

        self.captions_file = captions or next((os.path.join(self.path, name) for name in CAPTION_FILES
                                               if os.path.isfile(os.path.join(self.path, name))), None)
        self.captions = _read_captions(self.captions_file, self.path, [p for p, _ in self.videos])
        video_ids, starts = [], []
        for vid, ((_, n), span) in enumerate(zip(self.videos, spans)):
            clip_starts = np.arange(0, n - span + 1, span)
            if clips_per_video != "all" and len(clip_starts) > clips_per_video:
                keep = np.round(np.linspace(0, len(clip_starts) - 1, int(clips_per_video))).astype(int)
                clip_starts = clip_starts[keep]
            video_ids.append(np.full(len(clip_starts), vid, np.int64))
            starts.append(clip_starts.astype(np.int64))
        self._video_ids = np.concatenate(video_ids)
        self._starts = np.concatenate(starts)

    def __len__(self) -> int:
        return len(self._starts)

    def clip(self, index: int) -> tuple[str, int]:
        """(path, first frame) of clip `index`."""
        return self.videos[self._video_ids[index]][0], int(self._starts[index])

    def __getitem__(self, index: int) -> dict:
        return self.read(index, None)

    def read(self, index: int, rng: np.random.Generator | None) -> dict:
        """Clip `index`, its start drawn by `rng` when clip_start is "random" (see the class)."""
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range [0, {len(self)})")
        path, start = self.clip(index)
        vid = self._video_ids[index]
        stride = self.strides[vid]
        span = (self.clip_length - 1) * stride + 1
        start = transforms.clip_start(self.videos[vid][1], span, start, rng if self.clip_start == "random" else None)
        try:
            video = readers.read_video(path, start=start, num_frames=self.clip_length, frame_stride=stride)
        except Exception as err:  # noqa: BLE001
            raise UserError(
                f"path={path!r}: could not decode clip {index} (frames {start}..{start + span - 1}): "
                f"{_summary(err)}"
            ) from err
        if self.size is not None:
            rng = np.random.default_rng([self.seed, index]) if self.crop == "random" else None
            video = transforms.resize_and_crop(video, self.size, self.crop, rng)
        caption = self.captions.get(path, os.path.splitext(os.path.basename(path))[0])
        return {"video": video, "caption": caption, "path": path}

    def __repr__(self) -> str:
        return (
            f"VideoFolderSource(path={self.path!r}, clip_length={self.clip_length}, "
            f"frame_stride={self.frame_stride}, fps={self.fps}, clip_start={self.clip_start!r}, size={self.size}, crop={self.crop!r}, "
            f"clips_per_video={self.clips_per_video!r}, seed={self.seed}, videos={len(self.videos)}, "
            f"clips={len(self)}, skipped={self.num_skipped}, captions={self.captions_file!r})"
        )


class ImageFolderSource:
    """Images in the ImageFolder layout `root/class_name/.../xxx.png`, labelled by class folder.

    Classes are the sub-folders of `root` holding at least one image file, sorted by name; label i
    is the i-th class (torchvision `ImageFolder` convention). `tfds.folder_dataset.ImageFolder` is
    not used because it reads through `tf.io.gfile` / `tf.data` and needs TensorFlow, which genjax
    does not install. Each file is checked with Pillow's `Image.verify()` at construction (header
    and structure, no full decode); unreadable ones are skipped and recorded.

    `__getitem__(i)` -> `{"image": uint8 (H, W, 3), "label": int, "caption": class_name}`; with
    `size`, the shorter side is resized to `size` (Pillow bicubic) and the centre `size` x `size`
    square is kept, which batching images of mixed sizes needs.

    Args:
      path: the root folder.
      size: output side in pixels, or None for native sizes.
      extensions: file name endings that count as images (case-insensitive).

    Attributes:
      classes: class names, index = label.
      samples: list of (path, label), in index order.
      num_skipped, skipped_files: the unreadable files that were skipped.

    Raises:
      UserError: bad size, missing folder, no class folders with images, or no readable image;
        `__getitem__` raises UserError naming a file that fails to decode.
    """

    def __init__(self, path, *, size: int | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        from PIL import Image

        _check_size(size)
        self.path, self.size = _check_folder(path), size
        per_class = {}
        for name in sorted(os.listdir(self.path)):
            folder = os.path.join(self.path, name)
            if not name.startswith(".") and os.path.isdir(folder):
                files = _scan(folder, extensions)
                if files:
                    per_class[name] = files
        check(
            bool(per_class),
            "path",
            self.path,
            f"holds no class folders with images ({', '.join(extensions)}); expected root/class_name/image.png",
        )
        self.classes = list(per_class)
        self.samples: list[tuple[str, int]] = []
        self.skipped_files: list[str] = []
        total = 0
        for label, files in enumerate(per_class.values()):
            for f in files:
                total += 1
                try:
                    with Image.open(f) as im:
                        im.verify()
                    self.samples.append((f, label))
                except Exception as err:  # noqa: BLE001
                    _skip("ImageFolderSource", f, err, self.skipped_files)
        self.num_skipped = len(self.skipped_files)
        _report_skipped("ImageFolderSource", self.path, self.skipped_files, total)
        check(bool(self.samples), "path", self.path, f"none of its {total} image files could be read")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range [0, {len(self)})")
        path, label = self.samples[index]
        try:
            image = readers.read_image(path)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"path={path!r}: could not decode image {index}: {_summary(err)}") from err
        if self.size is not None:
            image = transforms.resize_and_crop(image[None], self.size, "center")[0]
        return {"image": image, "label": label, "caption": self.classes[label]}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(path={self.path!r}, size={self.size}, classes={len(self.classes)}, "
            f"images={len(self)}, skipped={self.num_skipped})"
        )
