"""`genjax data show`: through `genjax.cli.main` and once as the installed command."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from genjax import cli
from genjax.data.preview import parse_options
from genjax.io import readers


def test_parse_options_converts_values():
    assert parse_options(["num_frames=20", "speed=2,4.5", "crop=center", "size=none",
                          "shuffle=True", "caption_template=digits {d0}, {d1}"]) == {
        "num_frames": 20, "speed": (2, 4.5), "crop": "center", "size": None, "shuffle": True,
        "caption_template": "digits {d0}, {d1}"}


def test_show_moving_mnist_gif(tmp_path, capsys):
    out = tmp_path / "mm.gif"
    rc = cli.main(["data", "show", "moving_mnist", "--out", str(out), "--num", "4",
                   "--set", "num_frames=5", "--set", "image_size=32", "--set", "num_digits=2"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: 4 videos (5x32x32x1 uint8) from moving_mnist split=train seed=0")
    gif = readers.read_video(out)
    assert gif.shape[0] == 5 and gif.shape[1] >= 2 * 32 and gif.shape[2] >= 2 * 32
    assert not np.array_equal(gif[0], gif[-1])  # the digits move


def test_show_images_png_and_video_contact_sheet(tmp_path, capsys):
    out = tmp_path / "digits.png"
    assert cli.main(["data", "show", "mnist_embedded", "--out", str(out), "--num", "6",
                     "--split", "test", "--seed", "3"]) == 0
    assert "6 images (28x28x1 uint8) from mnist_embedded split=test seed=3" in capsys.readouterr().out
    grid = readers.read_image(out)
    assert grid.ndim == 3 and grid.shape[0] >= 2 * 28 and grid.shape[1] >= 3 * 28 and grid.max() == 255
    sheet = tmp_path / "sheet.png"
    assert cli.main(["data", "show", "moving_mnist", "--out", str(sheet), "--num", "2",
                     "--set", "num_frames=6", "--set", "image_size=28"]) == 0
    assert readers.read_image(sheet).shape[1] >= 6 * 28  # one row of 6 frames per video


def test_show_tfds_video_as_mp4(tmp_path, capsys):
    out = tmp_path / "bair.mp4"
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        assert cli.main(["data", "show", "bair_robot_pushing_small", "--out", str(out),
                         "--num", "2"]) == 0
    assert "2 videos (30x64x64x3 uint8)" in capsys.readouterr().out
    assert readers.read_video(out).shape[0] == 30


@pytest.mark.parametrize("argv, message", [
    (["no_such_dataset", "--out", "x.gif"], "dataset='no_such_dataset': must be moving_mnist"),
    (["moving_mnist", "--out", "x.gif", "--set", "colour=red"], "option='colour': is not an option"),
    (["moving_mnist", "--out", "x.jpg"], "--out='x.jpg': must end in one of"),
    (["moving_mnist", "--out", "x.gif", "--set", "num_frames"], "--set='num_frames': must be KEY=VALUE"),
    (["mnist_embedded", "--out", "x.gif"], "--out='x.gif': mnist_embedded holds images"),
    (["moving_mnist", "--out", "x.gif", "--num", "0"], "--num=0: must be >= 1"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "show", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"genjax data: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1
    assert message in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


def test_installed_command_writes_a_gif(tmp_path):
    out = tmp_path / "preview.gif"
    genjax = os.path.join(os.path.dirname(sys.executable), "genjax")
    done = subprocess.run([genjax, "data", "show", "moving_mnist", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: 16 videos (16x64x64x1 uint8)")
    gif = readers.read_video(out)
    # 16 videos of 16 frames tiled 4 x 4: every frame is at least 4 tiles of 64 px wide / high.
    assert gif.shape[0] == 16 and gif.shape[1] >= 4 * 64 and gif.shape[2] >= 4 * 64
    assert gif.shape[3] == 3 and gif.dtype == np.uint8


def _gif_folder(root, num_frames):
    from genjax.io import media

    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        media.write_gif(root / f"clip{k}.gif", rng.integers(0, 256, (num_frames, 8, 8, 3), dtype=np.uint8))
    return f"video_folder:{root}"


def test_show_video_folder_without_clip_length(tmp_path, capsys):
    """Issue 21, defect 9: `data show video_folder:PATH`, the form --help shows, raised TypeError
    (clip_length had no default); it now takes 16-frame clips, and a folder of shorter videos is
    one line saying which clip_length would fit."""
    out = tmp_path / "folder.png"
    assert cli.main(["data", "show", _gif_folder(tmp_path / "long", 16), "--out", str(out), "--num", "2"]) == 0
    assert "2 videos (16x8x8x3 uint8)" in capsys.readouterr().out
    assert cli.main(["data", "show", _gif_folder(tmp_path / "short", 4), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clip_length=16: a clip spans 16 frames" in err
    assert "--set clip_length=4" in err
