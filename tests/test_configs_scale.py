"""`genjax demo --config`: the text-to-video pipeline at scale (configs/demo_moving_mnist_large.py).

Fast: the full-size config's sizes fit together (VAE downsampling x DiT tubelets, frames, text
width, CLIP grid, captions), its video DiT has the parameter count computed by hand below, and
`--config` errors are one line (exit 2) before anything trains. Slow (~95 s on 2 cores, mostly XLA
compiles): the smoke version runs end to end through `genjax.cli.main`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import cli, demo, tasks
from genjax.config import load_config
from genjax.data.sources import MovingMnistSource
from genjax.models import tokenizer, video_dit, video_vae

LARGE = "configs/demo_moving_mnist_large.py"


def _large(arg=""):
    return load_config(demo.config_spec(LARGE + (f":{arg}" if arg else "")))


def test_large_config_sizes_fit_together():
    c = _large()
    d = c.dit.data
    for stage in (c.vae, c.text, c.dit):  # one data set: 64 x 64, 16 frames, two digits
        assert (stage.data.image_size, stage.data.num_frames, stage.data.num_digits) == (64, 16, 2)
    vae = tasks.make_model(video_vae, video_vae.VideoAutoencoderKL, c.vae.model)
    fs, ft = vae.downsample_factor, vae.temporal_downsample_factor
    assert (fs, ft, vae.temporal_kernel_size) == (4, 1, 3)
    pt, ph, pw = c.dit.model.patch_size
    assert d.image_size % (fs * ph) == 0 and d.image_size % (fs * pw) == 0
    assert (d.num_frames - 1) % ft == 0 and (1 + (d.num_frames - 1) // ft) % pt == 0
    latent = (1 + (d.num_frames - 1) // ft, d.image_size // fs, d.image_size // fs, vae.latent_channels)
    assert latent == (16, 16, 16, 4)
    assert np.prod([s // p for s, p in zip(latent[:3], (pt, ph, pw))]) == 1024  # tokens per clip
    # The DiT cross-attends to the frozen CLIP text tower's states: ViT-B/32's text tower.
    t = c.text.model
    assert (t.text_width, t.text_layers, t.text_heads) == (512, 12, 8)
    assert c.dit.task.text_length == t.context_length
    assert c.dit.model.hidden_size % c.dit.model.num_heads == 0
    grid = tuple(s // p for s, p in zip((c.text.data.num_frames, 64, 64), t.video_patch_size))
    assert all(g <= m for g, m in zip(grid, t.video_max_grid))
    # Every prompt is a caption the training data produces, and fits the text context.
    src = MovingMnistSource("train", num_examples=50, num_frames=2, image_size=64, num_digits=2)
    seen = {src[i]["caption"] for i in range(50)}
    assert all(s.startswith("digits ") and " and " in s for s in seen)
    for p in c.sample.prompts:
        a, b = int(p.split()[1]), int(p.split()[3])
        assert p == src.caption_template.format(d0=a, d1=b)
    _, mask = tokenizer.ByteTokenizer().encode(list(c.sample.prompts), t.context_length)
    assert mask.sum(1).max() < t.context_length
    # bfloat16 compute in every stage; batches split over 8 devices.
    assert {c.vae.model.dtype, c.text.model.dtype, c.dit.model.dtype} == {"bfloat16"}
    assert all(s.data.batch_size % 8 == 0 for s in (c.vae, c.text, c.dit))


def test_large_video_dit_parameter_count():
    """The full-size video DiT, built as the video_dit task builds it, has the parameters of a
    DiT-B/2 body (Peebles & Xie 2023, Table 1: D = 768, 12 blocks) plus text cross-attention,
    counted by hand here (not taken from the model)."""
    c = _large()
    m = c.dit.model
    module = tasks.make_model(video_dit, video_dit.VideoDiT, m, in_channels=4, context_dim=512, num_classes=0)
    x = jax.ShapeDtypeStruct((1, 16, 16, 16, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.ShapeDtypeStruct((1, 32, 512), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 32), jnp.bool_)
    params = jax.eval_shape(lambda k, x, t, s, mk: module.init(k, x, t, text=s, text_mask=mk),
                            jax.random.key(0), x, t, text, mask)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    D, depth, Dt, C, P = 768, 12, 512, 4, 1 * 2 * 2
    dense = lambda i, o: i * o + o  # noqa: E731
    block = (dense(D, 6 * D)                   # adaLN-Zero modulation
             + 4 * dense(D, D)                 # self-attention q, k, v, out
             + 4 * dense(D, D)                 # cross-attention q, k, v, out
             + dense(D, 4 * D) + dense(4 * D, D))  # MLP
    embed = (dense(P * C, D)                   # tubelet embedding
             + dense(256, D) + dense(D, D)     # timestep MLP
             + 2 * (dense(Dt, D) + dense(D, D)) + 2 * Dt)  # text tokens / pooled MLPs, null text
    final = dense(D, 2 * D) + dense(D, P * C)  # final adaLN + linear (no learned sigma)
    assert n == depth * block + embed + final == 159_853_328


def test_demo_config_spec_resolves_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/ is found in the checkout, not the current folder
    spec = demo.config_spec(LARGE + ":steps_scale=0.5", smoke=True)
    assert spec == os.path.join(demo.ROOT, LARGE) + ":steps_scale=0.5,smoke=True"
    assert demo.config_spec(None, steps_scale=2.0) == demo.CONFIG + ":steps_scale=2.0"
    c = load_config(demo.config_spec(LARGE, steps_scale=0.5))
    assert (c.vae.num_steps, c.text.num_steps, c.dit.num_steps) == (10_000, 2_500, 50_000)
    smoke = load_config(spec)
    assert smoke.dit.num_steps == 3 and smoke.dit.model.hidden_size == 32


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/nope.py"], r"--config='configs/nope.py': no such config file"),
    (["--config", LARGE + ":smok=True"], r"config arg smok='True': unknown key"),
    (["--config", "configs/dit_mnist.py"], r"is not a demo config: it lacks the sections"),
    (["--config", LARGE, "--config.dit.nope=1"], r"nope"),  # an unknown override key
    (["--config", LARGE, "--steps-scale", "-1"], r"--steps-scale=-1.0: must be > 0"),
])
def test_demo_config_errors_are_one_line(tmp_path, capsys, argv, message):
    import re

    assert cli.main(["demo", *argv, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genjax demo: error: ") and re.search(message, err[0]), err
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow  # ~95 s on 2 shared cores, almost all XLA compiles of tiny bfloat16 models
def test_large_demo_smoke_runs_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "demo_large")
    assert cli.main(["demo", "--config", LARGE + ":smoke=True", "--workdir", workdir]) == 0
    printed = capsys.readouterr().out
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        videos, prompts = f["videos"], f["prompts"]
    assert videos.dtype == np.uint8 and videos.shape == (2, 4, 32, 32, 1)
    assert list(prompts) == ["digits 3 and 7"] * 2
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert result["num_excluded"] == 2 and np.isnan(result["digit_accuracy"])  # two-digit prompts
    assert result["vae_reconstruction"]["psnr"] > 0
    assert [s["stage"] for s in result["stages"]] == ["vae", "text", "dit"]
    with open(os.path.join(workdir, "dit", "config.json")) as f:
        dit = json.load(f)
    assert dit["model"]["dtype"] == "bfloat16" and dit["task"]["latent_scale"] > 0
    assert dit["data"]["num_digits"] == 2 and dit["task"]["text_length"] == 32
    for stage in ("vae", "text", "dit"):
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert "Digit accuracy: not defined (no single-digit prompts)" in printed
