"""configs/dit_imagenet256.py: DiT-XL/2 on ImageNet 256 (Peebles & Xie 2023).

Fast: the full config's DiT has the paper's XL/2 parameter count (Table 4: 675 M), its optimizer
and schedule are the paper's, the ADM crop + random flip reach the trainer's batches, and a bad
data.crop is one UserError before compiling. The smoke config trains 2 steps end to end on
`tfds.testing.mock_data` imagenet2012 with a random-weight diffusers AutoencoderKL converted by
`genjax.convert.convert`.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from genjax import tasks
from genjax.config import load_config
from genjax.data import recipes, transforms
from genjax.diffusion import schedules
from genjax.errors import UserError
from genjax.models import dit
from genjax.train import state as state_lib
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "dit_imagenet256.py")


def config_of(arg="", *overrides):
    return load_config(CONFIG + (f":{arg}" if arg else ""), list(overrides))


@pytest.fixture(scope="module")
def sd_like_vae(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL (f = 2, 4 latent channels, scaling 0.18215 like the
    SD VAEs), saved in diffusers format and converted as `genjax convert --model vae` does."""
    import torch
    from diffusers import AutoencoderKL

    from genjax.convert import convert

    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(16, 16), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.18215).eval()
    root = tmp_path_factory.mktemp("sd_like_vae")
    ref.save_pretrained(root / "diffusers")
    return convert("vae", str(root / "diffusers"), str(root / "converted"))


def test_full_config_dit_is_xl2_with_the_paper_parameter_count():
    c = config_of("vae=runs/sd-vae-ft-ema")
    m = c.model
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (1152, 28, 16, 2)
    assert (m.num_classes, m.class_dropout_prob, m.learn_sigma) == (1000, 0.1, True)
    # Built as the dit task builds it: SD VAE latents 256 / 8 = 32 x 32 x 4.
    module = tasks.make_model(dit, dit.DiT, m, in_channels=4)
    assert module.dtype == jnp.bfloat16 and module.scan and module.out_dim == 8
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    i = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), x, i, i)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert abs(n / 675.1e6 - 1) < 0.01  # Table 4: DiT-XL/2 675 M
    assert n == 674_834_720  # + the fixed 256 x 1152 sin-cos table = DiT's 675,129,632


def test_full_config_follows_the_paper_training_setup():
    c = config_of("vae=runs/sd-vae-ft-ema")
    d = c.data
    assert (d.dataset, d.split, d.image_size, d.batch_size) == ("imagenet2012", "train", 256, 256)
    assert (c.data.crop, c.data.random_flip, c.data.latents) == ("adm_center", True, "on_the_fly")
    assert c.num_steps == 400_000 and c.task.vae == "runs/sd-vae-ft-ema"
    # AdamW, constant lr 1e-4, no weight decay, no clipping, EMA 0.9999 from the first step.
    o = c.optim
    assert (o.lr, o.schedule, o.warmup_steps) == (1e-4, "constant", 0)
    assert (o.weight_decay, o.grad_clip_norm) == (0.0, 0.0)
    assert (o.b1, o.b2, o.ema_decay, o.ema_warmup, o.grad_accum_steps) == (0.9, 0.999, 0.9999, False, 1)
    _, lr = state_lib.make_optimizer(o, c.num_steps)
    assert float(lr(0)) == float(lr(200_000)) == float(lr(399_999)) == pytest.approx(1e-4)
    # Linear betas 1e-4 .. 0.02 over T = 1000 (DDPM), eps-prediction.
    diff = c.diffusion
    s = schedules.make(diff.schedule, diff.num_timesteps, prediction_type=diff.prediction_type)
    np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-4, 0.02], rtol=1e-6)
    assert diff.prediction_type == "epsilon" and len(s.betas) == 1000
    assert (c.eval.sampler, c.eval.num_sampling_steps, c.eval.cfg_scale) == ("ddpm", 250, 1.5)
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)
    # Args.
    c = config_of("vae=v,latents=cache,steps=7000,fsdp=8")
    assert (c.data.latents, c.num_steps, c.mesh.fsdp) == ("cache", 7000, 8)
    with pytest.raises(UserError, match=r"^latents='disk': must be on_the_fly or cache"):
        config_of("latents=disk")


def test_adm_crop_and_random_flip_reach_the_batches():
    rng = np.random.default_rng(0)
    source = [{"image": rng.integers(0, 256, (40 + 7 * i, 90 - 5 * i, 3), dtype=np.uint8),
               "label": np.int32(i), "caption": "x"} for i in range(8)]
    c = config_of("smoke=True,vae=v")  # data.image_size 32, adm_center, random_flip
    ts = recipes.pixel_transforms(c, source, (recipes.image_inputs,))
    ds = recipes.dataset(c, source, ts, shuffle=False, shard_index=0, shard_count=1, num_epochs=1)
    images = np.concatenate([b["image"] for b in ds])
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    flipped = 0
    for i, got in enumerate(images):
        crop = transforms.to_float(transforms.adm_center_crop(source[i]["image"], 32))
        same, mirrored = np.array_equal(got, crop), np.array_equal(got, crop[:, ::-1])
        assert same or mirrored, i
        flipped += mirrored and not same
    assert 0 < flipped < 8  # probability 0.5 each: some of each (fixed seed)
    # crop "resize" (the default) squashes instead: not the ADM crop
    plain = recipes.pixel_transforms(config_of("smoke=True,vae=v", "--config.data.crop=resize",
                                              "--config.data.random_flip=false"), source)
    assert isinstance(plain[0], transforms.Resize) and len(plain) == 2


def test_bad_crop_is_one_user_error_before_compiling(tmp_path, sd_like_vae):
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"^data.crop='center': must be one of \('resize', 'adm_center'\)$"):
        config = config_of(f"smoke=True,vae={sd_like_vae}", "--config.data.crop=center")
        trainer.main(config, str(tmp_path / "w"))
    assert time.perf_counter() - start < 5
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


@pytest.mark.slow  # ~40 s under make test; the latent DiT path is covered by test_tasks.py's latent DiT tests
def test_smoke_config_trains_on_mock_imagenet_with_a_converted_vae(tmp_path, sd_like_vae):
    workdir = str(tmp_path / "dit_xl2_smoke")
    config = config_of(f"smoke=True,vae={sd_like_vae}")
    cached = config_of(f"smoke=True,vae={sd_like_vae},latents=cache")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        task = tasks.build(config, mesh=None)
        batch = next(task.make_data(workdir))
        trainer.main(config, workdir, devices=jax.devices()[:1])
        # latents=cache: posterior mean / std of the ADM-cropped, flipped images, computed once
        cache_batch = next(tasks.build(cached, mesh=None).make_data(str(tmp_path / "cached")))
    assert cache_batch["mean"].shape == cache_batch["std"].shape == (4, 16, 16, 4)
    spec = json.load(open(tmp_path / "cached" / "latents" / "train.json"))
    assert spec["num_examples"] == 8
    assert (spec["meta"]["crop"], spec["meta"]["random_flip"], spec["meta"]["image_size"]) == ("adm_center", True, 32)
    # ADM-cropped 32 x 32 RGB images of random sizes, ImageNet labels.
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert batch["label"].dtype == np.int32 and np.all((0 <= batch["label"]) & (batch["label"] < 1000))
    # The latents are the converted VAE's, scaled by its config's factor (f = 2 -> 16 x 16 x 4).
    vae_module, _ = tasks.load_frozen(sd_like_vae, family_name="vae")
    assert vae_module.scaling_factor == pytest.approx(0.18215) and vae_module.downsample_factor == 2
    assert task.encode(batch, jax.random.key(0)).shape == (4, 16, 16, 4)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["vb"] > 0 for r in losses)  # L_simple + L_vlb
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert os.path.getsize(os.path.join(workdir, "samples", "step_000002.png")) > 0  # DDPM-3, cfg 1.5
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["data"]["crop"] == "adm_center" and saved["model"]["learn_sigma"] is True
