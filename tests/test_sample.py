"""`genjax sample` on the smoke demo's trained stack (tests/test_demo.py's session fixture):
output files and shapes, same seed -> identical videos, image-to-video keeps the given first
frame's content, and one-line user errors for bad input."""

import functools
import os

import numpy as np
import pytest

from genjax import cli
from genjax.errors import UserError

# One smoke demo run per session, shared by test_demo.py and test_sample.py: keep both files on
# one xdist worker (`--dist loadgroup` in the Makefile) so the run is not repeated per worker.
pytestmark = pytest.mark.xdist_group(name="smoke_demo")


def _sample(workdir, out, *extra):
    return cli.main(["sample", "--workdir", workdir, "--prompt", "digit 3", "--num", "2", "--seed", "7",
                     "--steps", "3", "--out", str(out), *extra])


def test_sample_files_shapes_and_determinism(smoke_demo, tmp_path):
    workdir = smoke_demo[0]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert _sample(workdir, a) == 0
    assert _sample(os.path.join(workdir, "dit"), b) == 0  # the DiT stage folder works too
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["videos"].dtype == np.uint8 and fa["videos"].shape == (2, 8, 32, 32, 1)
        assert list(fa["prompts"]) == ["digit 3", "digit 3"]
        np.testing.assert_array_equal(fa["videos"], fb["videos"])
        assert not np.array_equal(fa["videos"][0], fa["videos"][1])  # different noise per video
    for ext in (".gif", ".mp4"):
        assert os.path.getsize(tmp_path / f"a{ext}") > 0


def test_sample_sampler_and_size(smoke_demo, tmp_path):
    out = tmp_path / "other.npz"
    assert cli.main(["sample", "--workdir", smoke_demo[0], "--prompt", "digit 3", "--prompt", "digit 5",
                     "--num", "1", "--steps", "3", "--sampler", "dpmpp_2m", "--frames", "4", "--height", "16",
                     "--width", "48", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["videos"].shape == (2, 4, 16, 48, 1)
        assert list(f["prompts"]) == ["digit 3", "digit 5"]


@functools.lru_cache(maxsize=2)
def _restored(workdir):
    from genjax import tasks

    return tasks.restore(os.path.join(workdir, "dit"))


def test_image_to_video_first_frame(smoke_demo, tmp_path):
    """The first latent frame is pinned to the init frame's latent, so the first decoded frame is
    the VAE's reconstruction of the image (the VAE is frame-wise: temporal kernel 1)."""
    import jax
    from PIL import Image

    from genjax.data.sources import MovingMnistSource

    workdir = smoke_demo[0]
    source = MovingMnistSource("test", num_examples=1, num_frames=1, image_size=32)
    frame = source[0]["video"][0]
    Image.fromarray(frame[..., 0]).save(tmp_path / "first.png")
    out = tmp_path / "i2v.npz"
    assert _sample(workdir, out, "--init-frame", str(tmp_path / "first.png")) == 0
    from genjax import tasks

    vae, vae_params = tasks.load_frozen(os.path.join(workdir, "vae"), family_name="video_vae")
    x = frame[None, None].astype(np.float32) / 127.5 - 1
    recon = vae.apply({"params": vae_params}, x, sample_posterior=False)[0]
    recon = np.asarray(jax.numpy.round((jax.numpy.clip(recon, -1, 1) + 1) * 127.5)).astype(np.int32)
    with np.load(out) as f:
        first = f["videos"][:, 0].astype(np.int32)
    assert np.abs(first - recon[0, 0][None]).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "--prompt='': must be a non-empty string"),
    (["--prompt", "digit 1", "--num", "0"], "--num=0: must be an integer >= 1"),
    (["--prompt", "digit 1", "--height", "30"], "height=30: must be a positive multiple of 8"),
    (["--prompt", "digit 1", "--frames", "0"], "--frames=0: must be an integer >= 1"),
    (["--prompt", "digit 1", "--sampler", "dpmpp"], "--sampler='dpmpp': must be one of"),
    (["--prompt", "digit 1", "--class-label", "3"], "--class-label=[3]: is for class-conditional image models"),
])
def test_sample_bad_input(smoke_demo, tmp_path, capsys, extra, message):
    code = cli.main(["sample", "--workdir", smoke_demo[0], "--out", str(tmp_path / "x.npz"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("genjax sample: error: " + message)
    assert not os.path.exists(tmp_path / "x.npz")


def test_sample_workdir_without_model(tmp_path, capsys):
    code = cli.main(["sample", "--workdir", str(tmp_path), "--prompt", "digit 1", "--out",
                     str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "holds no trained model" in err


def test_non_string_prompt(smoke_demo):
    import jax

    _, task, params = _restored(smoke_demo[0])
    with pytest.raises(UserError, match=r"prompts\[1\]=3: must be a str"):
        task.sample_fn(params, jax.random.PRNGKey(0), ["digit 1", 3], num_steps=2)


# Input files and prompts (issue 21, defects 7 and 10): unit tests of the checks `genjax sample`
# runs before restoring the model, so they need no trained workdir.


def test_workdir_that_is_a_file_says_so(tmp_path):
    from genjax.sample import model_dir

    (tmp_path / "f.npz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"--workdir='.*f\.npz': is a file, not a folder"):
        model_dir(str(tmp_path / "f.npz"))
    with pytest.raises(UserError, match=r"--workdir='.*missing': does not exist"):
        model_dir(str(tmp_path / "missing"))


def test_prompts_checked_against_the_runs_text_length():
    import ml_collections

    from genjax.sample import check_prompts

    config = ml_collections.ConfigDict({"task": {"text_length": 32}})
    check_prompts(["digit 3", "x" * 30], config)
    with pytest.raises(UserError, match=r"^--prompt\[1\]='x+': is 31 bytes of UTF-8; the model reads at most 30"):
        check_prompts(["digit 3", "x" * 31], config)
    with pytest.raises(UserError, match=r"^--prompt\[0\]=.*not valid UTF-8"):
        check_prompts(["digit \udcff"], config)


def test_init_frame_not_an_image(tmp_path):
    from genjax.sample import init_frames

    (tmp_path / "notes.png").write_text("not a png")
    with pytest.raises(UserError, match=r"^--init-frame='.*notes\.png': cannot be decoded as an image \(not an image"):
        init_frames(str(tmp_path / "notes.png"), 1, 32, 32, 1)
    with pytest.raises(UserError, match=r"^--init-frame='.*': is a folder, not an image file"):
        init_frames(str(tmp_path), 1, 32, 32, 1)
    (tmp_path / "frame.txt").write_text("x")
    with pytest.raises(UserError, match=r"^--init-frame='.*frame\.txt': extension must be one of"):
        init_frames(str(tmp_path / "frame.txt"), 1, 32, 32, 1)


def test_init_frame_of_another_aspect_is_center_cropped_not_stretched(tmp_path, capsys):
    """A 64 x 32 (W x H) frame for a 32 x 32 model: its central 32 x 32 is kept (was stretched)."""
    from PIL import Image

    from genjax.sample import init_frames

    img = np.zeros((32, 64), np.uint8)
    img[:, 16:48] = 200  # the centre is bright, the sides dark
    Image.fromarray(img).save(tmp_path / "wide.png")
    first = init_frames(str(tmp_path / "wide.png"), 2, 32, 32, 1)
    assert first.shape == (2, 1, 32, 32, 1) and first.dtype == np.uint8
    assert (first == 200).all()  # a stretch would bring in the dark sides
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is 64x32 (W x H), another aspect ratio than the model's 32x32" in err
    Image.fromarray(img[:, :32]).resize((64, 64)).save(tmp_path / "square.png")
    assert init_frames(str(tmp_path / "square.png"), 1, 16, 16, 1).shape == (1, 1, 16, 16, 1)
    assert capsys.readouterr().err == ""  # same aspect: resized, nothing to say
