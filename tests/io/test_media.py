"""genjax.io.media: round trips through real encoders (ffmpeg, Pillow) and exact grid layout."""

import errno
import os

import numpy as np
import pytest

from genjax.errors import UserError
from genjax.io import media, readers


def _gray_video(seed, t=6, h=30, w=40):
    v = np.random.default_rng(seed).integers(0, 256, (t, h, w, 1), dtype=np.uint8)
    v[3] = v[2]  # a repeated frame must survive (GIF encoders like to merge those)
    return v


def _smooth_video(t=12, h=33, w=47):
    y, x = np.mgrid[0:h, 0:w]
    frames = [
        np.stack(
            [128 + 60 * np.sin(x / 7 + s / 3), 128 + 60 * np.cos(y / 5 - s / 4), 128 + 50 * np.sin((x + y) / 9 + s / 5)],
            axis=-1,
        )
        for s in range(t)
    ]
    return np.stack(frames).astype(np.uint8)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def test_gif_round_trip_grayscale_is_exact(tmp_path):
    v = _gray_video(0)
    path = media.write_gif(tmp_path / "v.gif", v, fps=10)
    back = readers.read_video(path)
    assert back.shape == (6, 30, 40, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, np.repeat(v, 3, axis=-1))
    # RGB content with R = G = B is grayscale content too.
    rgb = np.repeat(_gray_video(1), 3, axis=-1)
    np.testing.assert_array_equal(readers.read_video(media.write_gif(tmp_path / "rgb.gif", rgb)), rgb)


def test_mp4_round_trip_close_and_odd_sizes_padded(tmp_path):
    v = _smooth_video()
    path = media.write_mp4(tmp_path / "v.mp4", v, fps=8)
    back = readers.read_video(path)
    assert back.shape == (12, 34, 48, 3)  # 33 x 47 padded to even for yuv420p
    assert _psnr(back[:, :33, :47], v) > 30
    # the padding repeats the edge pixels
    assert _psnr(back[:, 33, :47], back[:, 32, :47]) > 30


def test_read_video_start_and_stride_match_full_decode(tmp_path):
    v = _smooth_video(t=20, h=32, w=32)
    mp4 = media.write_mp4(tmp_path / "v.mp4", v)
    full = readers.read_video(mp4)
    np.testing.assert_array_equal(readers.read_video(mp4, start=7, num_frames=4, frame_stride=3), full[7:17:3])
    gif = media.write_gif(tmp_path / "g.gif", _gray_video(2, t=9))
    full = readers.read_video(gif)
    np.testing.assert_array_equal(readers.read_video(gif, start=1, num_frames=3, frame_stride=2), full[1:6:2])
    with pytest.raises(UserError, match="needs 10"):
        readers.read_video(gif, start=0, num_frames=10)


def test_png_grid_tiles_at_expected_offsets(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(1, 256, (5, 7, 9, 3), dtype=np.uint8)
    grid = readers.read_image(media.write_png_grid(tmp_path / "g.png", images, ncols=3))
    pad = 2
    assert grid.shape == (2 * (7 + pad) + pad, 3 * (9 + pad) + pad, 3)
    mask = np.zeros(grid.shape[:2], bool)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = pad + r * (7 + pad), pad + c * (9 + pad)
        np.testing.assert_array_equal(grid[y : y + 7, x : x + 9], images[i])
        mask[y : y + 7, x : x + 9] = True
    assert (grid[~mask] == 0).all()  # gaps, border and the empty sixth cell


def test_png_contact_sheet_one_row_per_video(tmp_path):
    videos = np.random.default_rng(4).integers(0, 256, (2, 4, 6, 5, 1), dtype=np.uint8)
    sheet = readers.read_image(media.write_png_grid(tmp_path / "s.png", videos))
    pad = 2
    assert sheet.shape == (2 * (6 + pad) + pad, 4 * (5 + pad) + pad, 3)
    for i in range(2):
        for t in range(4):
            y, x = pad + i * (6 + pad), pad + t * (5 + pad)
            np.testing.assert_array_equal(sheet[y : y + 6, x : x + 5, 0], videos[i, t, ..., 0])


def test_make_grid_keeps_middle_axes_frame_by_frame():
    videos = np.random.default_rng(5).integers(0, 256, (3, 4, 6, 5, 3), dtype=np.uint8)
    grid = media.make_grid(videos, ncols=2, pad=1)
    assert grid.shape == (4, 2 * 7 + 1, 2 * 6 + 1, 3)
    for t in range(4):
        np.testing.assert_array_equal(grid[t], media.make_grid(videos[:, t], ncols=2, pad=1))
    # ncols larger than N is clamped: one row
    assert media.make_grid(videos[:, 0], ncols=10, pad=0).shape == (6, 15, 3)


def test_captions_drawn_under_upscaled_tiles(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    plain = readers.read_image(media.write_png_grid(tmp_path / "a.png", images, ncols=2))
    cap = readers.read_image(media.write_png_grid(tmp_path / "b.png", images, ncols=2, captions=["zero", "one"]))
    other = readers.read_image(media.write_png_grid(tmp_path / "c.png", images, ncols=2, captions=["seven", "one"]))
    k, pad = 5, 2  # 28 px tiles upscale x5 to 140 >= 128 px
    assert plain.shape[0] == 28 + 2 * pad
    assert cap.shape[0] > 28 * k + 2 * pad and cap.shape[1] == 2 * (28 * k + pad) + pad
    np.testing.assert_array_equal(cap[pad : pad + 28 * k : k, pad : pad + 28 * k : k, 0], images[0, ..., 0])
    strip0 = cap[pad + 28 * k : -pad, pad : pad + 28 * k]
    strip1 = cap[pad + 28 * k : -pad, 2 * pad + 28 * k : -pad]
    assert strip0.max() > 0 and strip1.max() > 0  # text is drawn
    assert not np.array_equal(strip0, other[pad + 28 * k : -pad, pad : pad + 28 * k])  # and depends on it
    np.testing.assert_array_equal(strip1, other[pad + 28 * k : -pad, 2 * pad + 28 * k : -pad])


def test_captioned_gif_grid_has_all_frames(tmp_path):
    videos = np.stack([_gray_video(7, t=5, h=16, w=16)] * 3)
    back = readers.read_video(media.write_gif(tmp_path / "g.gif", videos, captions=["a", "b", "c"]))
    assert back.shape[0] == 5
    k = 8  # 16 px tiles upscale x8 to 128 px
    np.testing.assert_array_equal(back[:, 2 : 2 + 16 * k : k, 2 : 2 + 16 * k : k, 0], videos[0, ..., 0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: media.write_gif(p / "a.gif", np.zeros((2, 4, 4, 3), np.float32)), r"videos\.dtype='float32': must be uint8"),
        (lambda p: media.write_mp4(p / "a.mp4", np.zeros((4, 4, 3), np.uint8)), r"videos\.shape=\(4, 4, 3\)"),
        (lambda p: media.write_mp4(p / "a.mp4", np.zeros((2, 4, 4, 4), np.uint8)), "channels"),
        (lambda p: media.write_gif(p / "a.mp4", np.zeros((2, 4, 4, 3), np.uint8)), "extension"),
        (lambda p: media.write_gif(p / "a.gif", np.zeros((2, 2, 4, 4, 3), np.uint8), captions=["x"]), "len\\(captions\\)"),
        (lambda p: media.write_png_grid(p / "a.png", np.zeros((2, 2, 4, 4, 3), np.uint8), ncols=2), "ncols"),
        (lambda p: media.write_png_grid(p / "a.png", np.zeros((2, 4, 4, 3), np.int64)), "images_or_videos.dtype"),
        (lambda p: readers.read_video(p / "missing.mp4"), "does not exist"),
        (lambda p: readers.read_image(p / "a.tiff"), "extension"),
    ],
)
def test_bad_input_raises_user_error(tmp_path, call, match):
    with pytest.raises(UserError, match=match):
        call(tmp_path)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "g.png"
    old = np.full((1, 4, 4, 3), 9, np.uint8)
    media.write_png_grid(path, old, ncols=1)
    before = path.read_bytes()

    def crash(self, fp, *args, **kwargs):  # a full disk partway through the file
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(UserError) as e:
        media.write_png_grid(path, np.zeros((1, 4, 4, 3), np.uint8), ncols=1)
    assert len(str(e.value).splitlines()) == 1
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["g.png"]


def test_read_webm_written_by_ffmpeg(tmp_path):
    import imageio_ffmpeg

    v = _smooth_video(t=10, h=32, w=32)
    path = str(tmp_path / "v.webm")
    writer = imageio_ffmpeg.write_frames(path, (32, 32), fps=8, codec="libvpx-vp9", macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in v:
        writer.send(frame)
    writer.close()
    back = readers.read_video(path)
    assert back.shape == (10, 32, 32, 3) and readers.count_frames(path) == 10
    assert _psnr(back, v) > 25
    np.testing.assert_array_equal(readers.read_video(path, start=3, num_frames=3, frame_stride=2), back[3:8:2])
