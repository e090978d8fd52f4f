"""Media files at the edges: mp4 / gif / png-grid writers, `to_uint8` and `write_outputs`
(readers: `genjax.io.readers`).

Pixels are uint8 at the edges: videos `(N, T, H, W, C)` or one video `(T, H, W, C)`, images
`(N, H, W, C)`, with C in {1, 3} (grayscale or RGB). Nothing here converts floats: a float array
is a user error (convert with `to_uint8`), so a [-1, 1] model output is
never silently written as a black file.

Decoding and encoding go through maintained tools: ffmpeg (the binary shipped by imageio-ffmpeg)
for mp4 / webm / avi / mov and for GIF encoding, Pillow for GIF decoding, PNG and caption text.
Every writer writes to a temporary file in the destination folder and then `os.replace`s it, so
a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Sequence

import numpy as np

from genjax.errors import UserError, check, fail
from genjax.io import fs

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Tiles narrower than this are upscaled (nearest neighbour, integer factor) when captions are
# drawn, so that ~20 characters of the PIL default font (~11 px high) fit under each tile.
CAPTION_MIN_WIDTH = 128
# H.264 quality: constant rate factor 18 is "visually lossless" in the x264 documentation.
MP4_CRF = 18


# ----------------------------------------------------------------------------- validation


def _check_uint8(field: str, arr: np.ndarray) -> None:
    check(
        arr.dtype == np.uint8,
        f"{field}.dtype",
        str(arr.dtype),
        "must be uint8 (convert with genjax.io.media.to_uint8)",
    )


def _check_pixels(field: str, arr, ranks: tuple[int, ...], layout: str) -> np.ndarray:
    """Validate a uint8 channels-last array of one of `ranks`; return it as numpy."""
    arr = np.asarray(arr)
    _check_uint8(field, arr)
    check(arr.ndim in ranks, f"{field}.shape", arr.shape, f"must be {layout}")
    check(arr.shape[-1] in (1, 3), f"{field}.shape", arr.shape, "channels (last axis) must be 1 or 3")
    check(min(arr.shape) > 0, f"{field}.shape", arr.shape, "must have no empty axis")
    return arr


def check_ext(path: str, allowed: Sequence[str]) -> str:
    ext = os.path.splitext(path)[1].lower()
    check(ext in allowed, "path", path, f"extension must be one of {', '.join(allowed)}")
    return ext


def _check_captions(captions, n: int) -> list[str] | None:
    if captions is None:
        return None
    if isinstance(captions, str):
        captions = [captions]
    captions = [str(c) for c in captions]
    check(len(captions) == n, "len(captions)", len(captions), f"must equal the number of tiles ({n})")
    return captions


def _ffmpeg_encode(path: str, tmp: str, grid: np.ndarray, *, fps: float, codec: str,
                   pix_fmt_in: str, pix_fmt_out: str, output_params: list[str]) -> None:
    """Encode uint8 frames (T, H, W, C) into `tmp` with the ffmpeg of imageio-ffmpeg.

    The command is the one `imageio_ffmpeg.write_frames` builds, but run through `subprocess.run`
    so that ffmpeg's exit status is checked (`write_frames` ignores it: a full disk gave a 0-byte
    file and no error).

    Raises:
      UserError: ffmpeg failed or wrote nothing, naming `path` and ffmpeg's last error line.
    """
    import subprocess
    from fractions import Fraction

    import imageio_ffmpeg

    t, h, w, _ = grid.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
           "-s", f"{w}x{h}", "-pix_fmt", pix_fmt_in, "-r", str(Fraction(fps).limit_denominator()),
           "-i", "-", "-an", "-vcodec", codec, "-pix_fmt", pix_fmt_out, "-v", "error",
           *output_params, tmp]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(grid).tobytes(), capture_output=True)
    if proc.returncode == 0 and os.path.getsize(tmp) > 0:
        return
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    reason = lines[-1].strip() if lines else "wrote an empty file"
    fail("path", path, f"ffmpeg failed (exit status {proc.returncode}): {reason}; nothing was written "
         "under that name (a previous file there is unchanged)")


# ----------------------------------------------------------------------------- grids


def make_grid(arrays, ncols: int, pad: int = 2) -> np.ndarray:
    """Tile N images (or N videos frame by frame) into one grid, row-major.

    Layout matches `torchvision.utils.make_grid` (pad_value 0): tile i sits at row `i // ncols`,
    column `i % ncols`, with its top-left pixel at `(pad + row * (H + pad), pad + col * (W + pad))`;
    gaps and the border are `pad` pixels of zeros.

    Args:
      arrays: uint8 `(N, ..., H, W, C)`; the middle axes (e.g. T frames) are kept.
      ncols: tiles per row, >= 1 (clamped to N).
      pad: gap in pixels between tiles and around the border, >= 0.

    Returns:
      uint8 `(..., nrows * (H + pad) + pad, ncols * (W + pad) + pad, C)`, nrows = ceil(N / ncols).

    Raises:
      UserError: dtype is not uint8, rank < 4, C not in {1, 3}, ncols < 1 or pad < 0.
    """
    arrays = _check_pixels("arrays", arrays, tuple(range(4, 9)), "(N, ..., H, W, C)")
    check(isinstance(ncols, (int, np.integer)) and ncols >= 1, "ncols", ncols, "must be an int >= 1")
    check(isinstance(pad, (int, np.integer)) and pad >= 0, "pad", pad, "must be an int >= 0")
    n, h, w, c = arrays.shape[0], *arrays.shape[-3:]
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)
    lead = arrays.shape[1:-3]
    out = np.zeros(lead + (nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        row, col = divmod(i, ncols)
        y, x = pad + row * (h + pad), pad + col * (w + pad)
        out[..., y : y + h, x : x + w, :] = arrays[i]
    return out


def _default_ncols(n: int) -> int:
    return math.ceil(math.sqrt(n))


def _fit_text(draw, text: str, font, width: int) -> str:
    """`text`, or its longest prefix ending in ".." that is at most `width` px wide. Linear in
    `width`, whatever the text's length: no glyph is narrower than 1 px, so at most `width`
    characters can fit, and the cut is found by bisection over those."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (non-UTF-8 input)
    if len(text) <= width and draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, min(len(text), max(width, 0))  # the longest fitting prefix lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "..", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + ".." if lo else text[:1]


def _add_captions(tiles: np.ndarray, captions: list[str]) -> np.ndarray:
    """(N, ..., H, W, C) -> (N, ..., k*H + strip, k*W, C): upscale by k, text strip below.

    k is the smallest integer with k * W >= CAPTION_MIN_WIDTH (1 for wide tiles). Text is white
    on black in the PIL default font, cut with ".." when it is wider than the tile.
    """
    from PIL import Image, ImageDraw, ImageFont

    w = tiles.shape[-2]
    k = max(1, math.ceil(CAPTION_MIN_WIDTH / w))
    if k > 1:
        tiles = tiles.repeat(k, axis=-3).repeat(k, axis=-2)
    h, w, c = tiles.shape[-3:]
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox("Ag")
    strip_h = int(bottom) + 4
    strips = []
    for text in captions:
        canvas = Image.new("L", (w, strip_h), 0)
        draw = ImageDraw.Draw(canvas)
        cut = _fit_text(draw, text, font, w - 4)
        draw.text((2, 2), cut, fill=255, font=font)
        strips.append(np.asarray(canvas)[..., None].repeat(c, axis=-1))
    strips = np.stack(strips)  # (N, strip_h, w, c)
    strips = strips.reshape((len(captions),) + (1,) * (tiles.ndim - 4) + strips.shape[1:])
    strips = np.broadcast_to(strips, tiles.shape[:-3] + strips.shape[-3:])
    return np.concatenate([tiles, strips], axis=-3)


def _video_grid(videos, captions) -> np.ndarray:
    """One video (T, H, W, C) or N videos (N, T, H, W, C) -> one (T, H', W', C) animation."""
    videos = _check_pixels("videos", videos, (4, 5), "(T, H, W, C) or (N, T, H, W, C)")
    if videos.ndim == 4:
        videos = videos[None]
    captions = _check_captions(captions, videos.shape[0])
    if captions is not None:
        videos = _add_captions(videos, captions)
    n = videos.shape[0]
    return make_grid(videos, _default_ncols(n), pad=2 if n > 1 else 0)


# ----------------------------------------------------------------------------- writers


def write_mp4(path, videos, *, fps: float = 8, captions: Sequence[str] | None = None) -> str:
    """Write one video, or N videos tiled into a grid, as H.264 mp4.

    Encoded by ffmpeg's libx264 (via imageio-ffmpeg) at CRF 18 in yuv420p, the pixel format every
    player decodes. yuv420p needs even width and height, so an odd H or W is padded by one row /
    column repeating the edge pixels (the file is then one pixel taller / wider than the input).
    H.264 is lossy: expect ~35-45 dB PSNR on smooth content.

    Args:
      path: destination, must end in `.mp4`; its folder is created if missing.
      videos: uint8 `(T, H, W, C)` or `(N, T, H, W, C)`, C in {1, 3}. N > 1 videos are tiled
        ceil(sqrt(N)) per row with a 2 px black gap (see `make_grid`).
      fps: frames per second, > 0.
      captions: optional N strings drawn under the tiles (see `write_gif`).

    Returns:
      `path`.

    Raises:
      UserError: bad extension, dtype, rank, channels, fps or caption count; ffmpeg failing or the
        file not being writable (a full or read-only disk: see `genjax.io.fs.atomic_path`).
    """
    path = os.fspath(path)
    check_ext(path, (".mp4",))
    check(fps > 0, "fps", fps, "must be > 0")
    grid = _video_grid(videos, captions)
    t, h, w, c = grid.shape
    grid = np.pad(grid, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with fs.atomic_path(path) as tmp:
        _ffmpeg_encode(path, tmp, grid, fps=fps, codec="libx264", pix_fmt_in="gray" if c == 1 else "rgb24",
                       pix_fmt_out="yuv420p", output_params=["-crf", str(MP4_CRF)])
    return path


def write_gif(path, videos, *, fps: float = 8, captions: Sequence[str] | None = None) -> str:
    """Write one video, or N videos tiled into a grid, as a looping GIF animation.

    Encoded by ffmpeg with a palette per frame (`palettegen=stats_mode=single` +
    `paletteuse=new=1:dither=none`), the standard ffmpeg GIF recipe, which keeps every frame (also
    repeated ones) so the file reads back with T frames. Grayscale content (any C = 1 video, or
    RGB with R = G = B) round-trips exactly; colour content is quantised to 256 colours per frame
    (palettegen picks colours in a perceptual space, so even <= 256 colours may move by a level). GIF delays are whole centiseconds, so fps is rounded accordingly.

    Captions: one string per video drawn in the PIL default font, white on black, in a strip under
    each tile (the same on every frame). Tiles narrower than 128 px (e.g. 28 or 64 px frames) are
    first upscaled by the smallest integer factor reaching 128 px, nearest neighbour, so the text
    is readable; text wider than the tile is cut and ends with "..".

    Args:
      path: destination, must end in `.gif`.
      videos: uint8 `(T, H, W, C)` or `(N, T, H, W, C)`, C in {1, 3}; N > 1 are tiled
        ceil(sqrt(N)) per row with a 2 px black gap.
      fps: frames per second, > 0.
      captions: optional sequence of N strings (a single string for one video).

    Returns:
      `path`.

    Raises:
      UserError: bad extension, dtype, rank, channels, fps or caption count; ffmpeg failing or the
        file not being writable (a full or read-only disk: see `genjax.io.fs.atomic_path`).
    """
    path = os.fspath(path)
    check_ext(path, (".gif",))
    check(fps > 0, "fps", fps, "must be > 0")
    grid = _video_grid(videos, captions)
    if grid.shape[-1] == 1:
        grid = grid.repeat(3, axis=-1)
    palette = (
        "split[a][b];[a]palettegen=max_colors=256:reserve_transparent=0:stats_mode=single[p];"
        "[b][p]paletteuse=new=1:dither=none"
    )
    with fs.atomic_path(path) as tmp:
        _ffmpeg_encode(path, tmp, grid, fps=fps, codec="gif", pix_fmt_in="rgb24", pix_fmt_out="pal8",
                       output_params=["-filter_complex", palette, "-loop", "0"])
    return path


def write_png_grid(
    path, images_or_videos, *, captions: Sequence[str] | None = None, ncols: int | None = None
) -> str:
    """Write images as one PNG grid, or videos as a contact sheet (one row of frames per video).

    Images `(N, H, W, C)` are tiled `ncols` per row (default ceil(sqrt(N))) by `make_grid` with a
    2 px black gap. Videos `(N, T, H, W, C)` become one row each: frame t of video i sits at
    `(2 + i * (H' + 2), 2 + t * (W + 2))`, H' = H plus the caption strip. PNG is lossless; C = 1 is
    written as an 8-bit grayscale PNG. Captions: one per image / per video row, drawn as in
    `write_gif` (tiles narrower than 128 px are upscaled first).

    Args:
      path: destination, must end in `.png`.
      images_or_videos: uint8 `(N, H, W, C)` or `(N, T, H, W, C)`, C in {1, 3}.
      captions: optional N strings.
      ncols: images per row, >= 1; only for images (a contact sheet has one video per row).

    Returns:
      `path`.

    Raises:
      UserError: bad extension, dtype, rank, channels, caption count, or ncols given for videos;
        the file not being writable (see `genjax.io.fs.atomic_path`).
    """
    from PIL import Image

    path = os.fspath(path)
    check_ext(path, (".png",))
    arr = _check_pixels(
        "images_or_videos", images_or_videos, (4, 5), "(N, H, W, C) images or (N, T, H, W, C) videos"
    )
    n, pad = arr.shape[0], 2
    captions = _check_captions(captions, n)
    if arr.ndim == 5:
        check(ncols is None, "ncols", ncols, "must be None for videos (one row per video)")
        # Each video becomes one wide tile: its frames side by side, `pad` px apart.
        arr = np.stack([make_grid(v, arr.shape[1], pad)[pad:-pad or None, pad:-pad or None] for v in arr])
        ncols = 1
    ncols = _default_ncols(n) if ncols is None else ncols
    if captions is not None:
        arr = _add_captions(arr, captions)
    grid = make_grid(arr, ncols, pad)
    with fs.atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------- model outputs


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]: `round((x + 1) * 127.5)` (half to even) clipped to
    [0, 255], NaN -> 0. Any shape; a jax array (or a value inside jit) stays a jax array, a NumPy
    array stays NumPy. The exact inverse of `data.transforms.to_float` on its outputs."""
    import jax
    import jax.numpy as jnp

    xp = jnp if isinstance(x, jax.Array) else np
    y = xp.round((xp.asarray(x, xp.float32) + 1.0) * 127.5)
    return xp.clip(xp.nan_to_num(y), 0, 255).astype(xp.uint8)


def output_paths(out: str, video: bool) -> list[str]:
    """The files `write_outputs(out, ...)` writes: `out` and a GIF + MP4 (videos) or a PNG
    (images) beside it, with the same stem."""
    stem = os.path.splitext(os.fspath(out))[0]
    return [os.fspath(out)] + ([stem + ".gif", stem + ".mp4"] if video else [stem + ".png"])


def write_outputs(out: str, samples: np.ndarray, captions: Sequence, *, fps: float = 8) -> list[str]:
    """`genjax sample`'s files. Videos uint8 (N, T, H, W, C): `out` (.npz with `videos` and
    `prompts`) plus a GIF and an MP4 beside it (same stem); images uint8 (N, H, W, C): `out`
    (.npz with `images` and `class_labels` int32, or `prompts` when the captions are str, a
    text-to-image model's) plus a PNG grid (`output_paths`). All files are
    written to temporary names first and renamed into place only once every one is complete: a
    failure leaves none of them changed. Returns the paths.

    Raises:
      UserError: `out` not a .npz path; samples not uint8 of rank 4 or 5; len(captions) != N; a
        file that cannot be written (full or read-only disk) or a failed encode, naming the path.
    """
    check(str(out).endswith(".npz"), "--out", out, "must be a .npz file")
    samples = np.asarray(samples)
    _check_pixels("samples", samples, (4, 5), "(N, H, W, C) or (N, T, H, W, C)")
    check(len(captions) == len(samples), "captions", len(captions), f"must be one per sample ({len(samples)})")
    video = samples.ndim == 5
    paths = output_paths(out, video)
    prompted = any(isinstance(c, str) for c in captions)  # text-to-image (DALL·E): prompts, not labels
    arrays = ({"videos": samples, "prompts": np.asarray([str(c) for c in captions])} if video else
              {"images": samples, "prompts": np.asarray([str(c) for c in captions])} if prompted else
              {"images": samples, "class_labels": np.asarray(captions, np.int32)})
    with contextlib.ExitStack() as stack:  # renames happen on leaving, after every file is written
        tmps = [stack.enter_context(fs.atomic_path(p, "--out" if p == paths[0] else "path")) for p in paths]
        try:
            try:
                with open(tmps[0], "wb") as f:
                    np.savez(f, **arrays)
            except OSError as e:
                raise fs.write_error("--out", paths[0], e, samples.nbytes) from e
            if video:
                captions = [str(c) for c in captions]
                write_gif(tmps[1], samples, fps=fps, captions=captions)
                write_mp4(tmps[2], samples, fps=fps, captions=captions)
            else:
                write_png_grid(tmps[1], samples, captions=[str(c) if prompted else f"class {int(c)}" for c in captions])
        except UserError as e:  # name the final file, not its temporary name
            message = str(e)
            for tmp, path in zip(tmps, paths):
                message = message.replace(repr(tmp), repr(path))
            raise UserError(message) from e
    return paths
