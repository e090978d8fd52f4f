"""Media readers: video files (mp4 / webm / avi / mov / mkv through the ffmpeg binary of
imageio-ffmpeg, GIF through Pillow) and images, as uint8 arrays.

Readers always return RGB (C = 3): grayscale files come back with three equal channels.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from genjax.errors import UserError, check
from genjax.io.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, check_ext


def _check_readable(path, allowed: Sequence[str]) -> tuple[str, str]:
    path = os.fspath(path)
    ext = check_ext(path, allowed)
    check(os.path.isfile(path), "path", path, "file does not exist")
    return path, ext


def count_frames(path) -> int:
    """Number of frames in a video file.

    GIF: Pillow's `n_frames`. Other formats: `imageio_ffmpeg.count_frames_and_secs`, which decodes
    the first video stream with ffmpeg (exact, but about as slow as a full decode).

    Raises:
      UserError: unknown extension or missing file.
      RuntimeError / OSError: the decoder cannot read the file (corrupt or truncated).
    """
    path, ext = _check_readable(path, VIDEO_EXTENSIONS)
    if ext == ".gif":
        from PIL import Image

        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    import imageio_ffmpeg

    nframes, _ = imageio_ffmpeg.count_frames_and_secs(path)
    return int(nframes)


def frame_rate(path) -> float:
    """A video file's nominal frames per second: ffmpeg's stream rate (imageio-ffmpeg's header
    probe, no decode), or for a GIF 1000 / its mean frame duration in ms (10 fps when the GIF
    records none).

    Raises:
      UserError: unknown extension, missing file, or a file that reports no frame rate.
      RuntimeError / OSError: the decoder cannot read the file.
    """
    path, ext = _check_readable(path, VIDEO_EXTENSIONS)
    if ext == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            ms = [frame.info.get("duration", 0) for frame in ImageSequence.Iterator(im)]
        mean = sum(ms) / max(len(ms), 1)
        return 1000.0 / mean if mean > 0 else 10.0
    fps = _ffmpeg_fps(path)
    check(fps > 0, "path", path, "reports no frame rate (needed by fps)")
    return fps


def _ffmpeg_fps(path: str) -> float:
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    try:
        return float(next(gen)["fps"])
    finally:
        gen.close()


def _read_ffmpeg(path: str, start: int, span: int | None) -> list[np.ndarray]:
    """Frames start .. start + span - 1 (all to the end if span is None), RGB uint8."""
    import imageio_ffmpeg

    input_params = []
    if start > 0:
        # Accurate input seek (ffmpeg decodes from the previous keyframe and drops frames before
        # the target time). Frame k is shown at k / fps; half a frame earlier is a safe target.
        fps = _ffmpeg_fps(path)
        if fps <= 0:
            raise RuntimeError(f"{path}: ffmpeg reports no frame rate, cannot seek")
        input_params = ["-ss", f"{(start - 0.5) / fps:.6f}"]
    output_params = ["-map", "0:v:0", "-fps_mode", "passthrough"]
    if span is not None:
        output_params += ["-frames:v", str(span)]
    gen = imageio_ffmpeg.read_frames(path, input_params=input_params, output_params=output_params)
    try:
        w, h = next(gen)["size"]
        return [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
    finally:
        gen.close()


def _read_gif(path: str, start: int, span: int | None) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    frames = []
    with Image.open(path) as im:
        for i, frame in enumerate(ImageSequence.Iterator(im)):
            if span is not None and i >= start + span:
                break
            if i >= start:
                frames.append(np.asarray(frame.convert("RGB")))
    return frames


def read_video(path, *, start: int = 0, num_frames: int | None = None, frame_stride: int = 1) -> np.ndarray:
    """Decode a video file (mp4, gif, webm, avi, mov, mkv) to RGB uint8 frames.

    Returns frames `start, start + frame_stride, ...`: `num_frames` of them, or all to the end when
    `num_frames` is None. mp4 / webm / avi / mov / mkv are decoded by ffmpeg (imageio-ffmpeg),
    first video stream, frames passed through without rate conversion; a `start` > 0 seeks to
    time `(start - 0.5) / fps`, exact for constant-frame-rate files (the usual case; a
    variable-frame-rate file is indexed by time at its nominal fps). GIF is decoded by Pillow,
    frame by frame, disposal and transparency applied.

    Args:
      path: the file.
      start: first frame index, >= 0.
      num_frames: number of frames to return (>= 1), or None for all.
      frame_stride: step between returned frames, >= 1.

    Returns:
      uint8 `(T, H, W, 3)`.

    Raises:
      UserError: unknown extension, missing file, bad start / num_frames / frame_stride, or the
        file has fewer than `start + (num_frames - 1) * frame_stride + 1` frames.
      RuntimeError / OSError: the decoder cannot read the file.
    """
    path, ext = _check_readable(path, VIDEO_EXTENSIONS)
    check(isinstance(start, (int, np.integer)) and start >= 0, "start", start, "must be an int >= 0")
    check(
        isinstance(frame_stride, (int, np.integer)) and frame_stride >= 1,
        "frame_stride",
        frame_stride,
        "must be an int >= 1",
    )
    check(
        num_frames is None or (isinstance(num_frames, (int, np.integer)) and num_frames >= 1),
        "num_frames",
        num_frames,
        "must be None or an int >= 1",
    )
    span = None if num_frames is None else (num_frames - 1) * frame_stride + 1
    frames = (_read_gif if ext == ".gif" else _read_ffmpeg)(path, int(start), span)
    if span is not None and len(frames) < span:
        raise UserError(
            f"path={path!r}: has {len(frames)} decodable frames from frame {start}, "
            f"needs {span} (num_frames={num_frames}, frame_stride={frame_stride})"
        )
    if not frames:
        raise UserError(f"path={path!r}: no decodable frames from frame {start}")
    return np.stack(frames[::frame_stride])


def read_image(path, *, field: str = "path") -> np.ndarray:
    """Decode an image file (png, jpg, jpeg, bmp, gif first frame, webp) with Pillow.

    Returns:
      uint8 `(H, W, 3)` RGB; grayscale, palette and alpha images are converted by Pillow's
      `convert("RGB")` (alpha is dropped).

    Raises:
      UserError: unknown extension, missing file, or a file Pillow cannot decode (not an image,
        truncated, unreadable): one line naming `field` (the caller's name for the path) and the file.
    """
    from PIL import Image

    path, _ = _check_readable(path, IMAGE_EXTENSIONS)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        reason = "not an image format Pillow recognises" if isinstance(e, Image.UnidentifiedImageError) \
            else " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(f"{field}={path!r}: cannot be decoded as an image ({reason})") from None
