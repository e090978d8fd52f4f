"""`genjax sample` on image models: converted diffusers folders checked against diffusers'
DiTPipeline / DDIMPipeline (random weights, same initial noise), a `genjax train` DiT run, and
one-line user errors."""

import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

from genjax import cli
from genjax.convert import convert

torch.set_num_threads(1)


def _randomised(m, std):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Tiny random diffusers DiT (latent 8 x 8 x 4, 1000 classes + null, as DiT-XL-2-256), a
    2-level AutoencoderKL (f = 2) and a DDPM-layout U-Net, saved and converted."""
    root = tmp_path_factory.mktemp("sample_images")
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    dit = _randomised(dit, 0.1)
    emb0 = dit.transformer_blocks[0].norm1.emb.state_dict()  # one embedder, as in real checkpoints
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0)
    vae = _randomised(AutoencoderKL(block_out_channels=(16, 16), layers_per_block=1, latent_channels=4,
                                    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.18215), 0.1)
    unet = _randomised(UNet2DModel(sample_size=16, block_out_channels=(8, 16), layers_per_block=1,
                                   norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4), 0.1)
    out = {}
    for name, model in (("dit", dit), ("vae", vae), ("unet", unet)):
        model.save_pretrained(root / f"{name}_diffusers")
        out[name] = convert(name, str(root / f"{name}_diffusers"), str(root / name))
    return out, dit, vae, unet


def _scheduler():  # the DiT / DDPM training schedule (linear 1e-4 .. 0.02, T = 1000)
    return DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


def _noise_like_ours(seed, shape):
    """The initial noise `tasks.diffusion.generate` draws: split(PRNGKey(seed))[0], NHWC."""
    noise_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    return np.asarray(jax.random.normal(noise_rng, shape))


def _run(monkeypatch, pipeline_module, pipe, noise_nhwc, **kw):
    """Run a diffusers pipeline with its `randn_tensor` replaced by our initial noise."""
    noise = torch.from_numpy(noise_nhwc.transpose(0, 3, 1, 2).copy())
    monkeypatch.setattr(pipeline_module, "randn_tensor", lambda *a, **k: noise.clone())
    with torch.no_grad():
        return pipe(output_type="np", num_inference_steps=8, **kw).images  # NHWC float in [0, 1]


def _assert_same_image(ours_uint8, theirs_float):
    theirs = np.round(theirs_float * 255).astype(np.int32)
    assert ours_uint8.shape == theirs.shape and ours_uint8.dtype == np.uint8
    assert theirs.std() > 5  # a real image, not a constant
    assert np.abs(ours_uint8.astype(np.int32) - theirs).max() <= 1


def test_converted_dit_matches_diffusers_dit_pipeline(converted, tmp_path, monkeypatch):
    """CLI: converted DiT + converted VAE, DDIM-8 with guidance 4 == DiTPipeline (same noise)."""
    from diffusers.pipelines.dit import pipeline_dit

    paths, dit, vae, _ = converted
    out = tmp_path / "dit.npz"
    labels = [207, 360, 3]
    argv = ["sample", "--workdir", paths["dit"], "--vae", paths["vae"], "--num", "1", "--seed", "5",
            "--steps", "8", "--cfg-scale", "4", "--out", str(out)]
    for y in labels:
        argv += ["--class-label", str(y)]
    assert cli.main(argv) == 0
    with np.load(out) as f:
        ours, class_labels = f["images"], f["class_labels"]
    assert ours.shape == (3, 16, 16, 3) and class_labels.tolist() == labels
    assert os.path.getsize(tmp_path / "dit.png") > 0
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=_scheduler())
    theirs = _run(monkeypatch, pipeline_dit, pipe, _noise_like_ours(5, (3, 8, 8, 4)),
                  class_labels=labels, guidance_scale=4.0)
    _assert_same_image(ours, theirs)
    # The same seed again gives the same images; another seed other images.
    assert cli.main(argv) == 2  # an existing --out is refused ...
    argv.append("--overwrite")  # ... unless asked for
    assert cli.main(argv) == 0
    with np.load(out) as f:
        np.testing.assert_array_equal(f["images"], ours)
    argv[argv.index("--seed") + 1] = "6"
    assert cli.main(argv) == 0
    with np.load(out) as f:
        assert not np.array_equal(f["images"], ours)


def test_converted_unet_matches_diffusers_ddim_pipeline(converted, tmp_path, monkeypatch):
    from diffusers.pipelines.ddim import pipeline_ddim

    paths, _, _, unet = converted
    out = tmp_path / "unet.npz"
    assert cli.main(["sample", "--workdir", paths["unet"], "--num", "2", "--seed", "1", "--steps", "8",
                     "--out", str(out)]) == 0
    with np.load(out) as f:
        ours = f["images"]
    pipe = DDIMPipeline(unet=unet, scheduler=_scheduler())
    theirs = _run(monkeypatch, pipeline_ddim, pipe, _noise_like_ours(1, (2, 16, 16, 3)), batch_size=2, eta=0.0)
    _assert_same_image(ours, theirs)


def test_trained_dit_workdir(tmp_path):
    workdir = str(tmp_path / "dit")
    assert cli.main(["train", "--config", "configs/dit_mnist.py:smoke=True", "--workdir", workdir]) == 0
    out = tmp_path / "threes.npz"
    assert cli.main(["sample", "--workdir", workdir, "--class-label", "3", "--class-label", "7", "--num", "2",
                     "--steps", "3", "--sampler", "dpmpp_2m", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape[0] == 4 and f["images"].shape[-1] == 1
        assert f["class_labels"].tolist() == [3, 3, 7, 7]
    # any multiple of the patch (smoke: 4) samples, non-square too; --height was ignored before
    wide = tmp_path / "wide.npz"
    assert cli.main(["sample", "--workdir", workdir, "--class-label", "3", "--height", "16", "--width", "36",
                     "--steps", "2", "--out", str(wide)]) == 0
    with np.load(wide) as f:
        assert f["images"].shape[1:] == (16, 36, 1)


@pytest.mark.parametrize("extra, message", [
    ([], "--vae=None: is required"),  # a latent DiT without its VAE
    (["--vae", "VAE", "--class-label", "1000"], "--class-label=[1000]: must be ints in [0, 1000)"),
    (["--vae", "VAE", "--prompt", "digit 3"], "--prompt=['digit 3']: is for text-to-video models"),
    (["--vae", "VAE", "--height", "18", "--width", "18"], "--height=18: must be a multiple of 4"),
    (["--vae", "VAE", "--height", "16", "--width", "30"], "width=30: must be a multiple of 4"),
    (["--vae", "UNET"], "unet': must be a `genjax convert --model vae` folder"),
])
def test_bad_input_one_line_errors(converted, tmp_path, capsys, extra, message):
    paths = converted[0]
    extra = [{"VAE": paths["vae"], "UNET": paths["unet"]}.get(a, a) for a in extra]
    code = cli.main(["sample", "--workdir", paths["dit"], "--out", str(tmp_path / "x.npz"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "x.npz")


def test_converted_vae_alone_cannot_sample(converted, tmp_path, capsys):
    assert cli.main(["sample", "--workdir", converted[0]["vae"], "--out", str(tmp_path / "x.npz")]) == 2
    assert "cannot sample alone" in capsys.readouterr().err
