"""What the trainer trains: one builder per `config.model.name`, each returning a `Task`.

    "dit"        class-conditional DiT (Peebles & Xie 2023) on pixels, or on the latents of a
                 frozen VAE when `model.vae` is set (LDM, Rombach et al. 2022): latents encoded
                 inside the train step (`data.latents="on_the_fly"`) or from a latent cache
                 (`"cache"`, `genjax.data.latent_cache`); samples are decoded by the VAE.
    "unet"       pixel-space DDPM / ADM U-Net (Ho et al. 2020), class-conditional when
                 `model.num_classes > 0` (label dropout -> classifier-free guidance).
    "vae"        2D KL autoencoder (`vae.vae_loss`); samples are reconstructions.
    "video_vae"  causal video KL autoencoder on Moving MNIST clips; samples are reconstructions.
    "clip"       contrastive text <-> image or video (byte tokenizer); no samples, zero-shot
                 accuracy as its evaluation.
    "video_dit"  text-to-video latent diffusion (Sora-style `genjax.models.video_dit.VideoDiT`) on
                 the latents of a frozen video VAE, conditioned on Moving MNIST captions through
                 a text tower trained jointly (or a frozen CLIP text tower); samples are videos.

`build(config)` is a plain if-chain over these names. A `Task` holds pure functions; the trainer
(`genjax.train.trainer.main`) owns the mesh, the state, the loop and the files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check

MODEL_NAMES = ("dit", "unet", "vae", "video_vae", "clip", "video_dit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LATENT_MODES = ("on_the_fly", "cache")
CROPS = ("resize", "adm_center")  # data.crop: see `_pixel_transforms`
CACHE_BATCH = 500  # examples per VAE forward while filling a latent cache


class Task(NamedTuple):
    """One trainable model, as pure functions of its params.

    Fields:
      module: the Flax module (what `restore_trained` hands to users).
      init_params: `key -> params` (boxed, with logical axis names), for `state.create_train_state`.
      loss_fn: `(params, batch, rng) -> (loss float32 scalar, metrics dict of float32 scalars)`.
      sample_fn: `(params, rng, **kw) -> uint8 media`: images `(N, H, W, C)` (written as a PNG
        grid) or videos `(N, T, H, W, C)` (a GIF), jitted; None for models without samples.
      make_data: `(workdir, shard_index=None, shard_count=None) -> grain iterator` of batches
        (dicts of numpy arrays with a leading batch axis); `workdir` holds any cache it builds.
      evaluate: `params -> {name: float}` metrics logged at sample time, or None.
      encode: the latent DiT's `(batch, rng) -> latents` (the diffusion model's x0), else None.
    """

    module: nn.Module
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
    sample_fn: Callable[..., jax.Array] | None
    make_data: Callable[..., Any]
    evaluate: Callable[[Any], dict[str, float]] | None = None
    encode: Callable[[Mapping[str, jax.Array], jax.Array], jax.Array] | None = None


# --------------------------------------------------------------------------- config checks

def _is_model_dir(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def validate(config) -> None:
    """The model section's checks, needing no devices or files beyond existence.

    Raises:
      UserError: unknown model.name or model.dtype; an unknown data.crop or a data.random_flip
        that is not a bool; for a latent DiT, a `model.vae` that is not a trained VAE workdir or
        a `genjax convert` folder, or an unknown `data.latents`; for a video DiT, a `model.vae` /
        `model.text_encoder` that is not a workdir holding config.json.
    """
    m = config.model
    check(m.name in MODEL_NAMES, "model.name", m.name, f"must be one of {MODEL_NAMES}")
    crop = config.data.get("crop", "resize")
    check(crop in CROPS, "data.crop", crop, f"must be one of {CROPS}")
    flip = config.data.get("random_flip", False)
    check(isinstance(flip, bool), "data.random_flip", flip, "must be true or false")
    check(m.get("dtype", "float32") in DTYPES, "model.dtype", m.get("dtype"), f"must be one of {tuple(DTYPES)}")
    if m.name == "dit" and m.get("vae", ""):
        check(_is_model_dir(m.vae), "model.vae", m.vae, "must be a trained VAE workdir (genjax "
              "train) or a `genjax convert --model vae` folder holding config.json")
        latents = config.data.get("latents", "on_the_fly")
        check(latents in LATENT_MODES, "data.latents", latents, f"must be one of {LATENT_MODES}")
    if m.name == "video_dit":
        check(_is_model_dir(m.get("vae", "")), "model.vae", m.get("vae", ""),
              "must be a trained video VAE workdir (genjax train, model.name=video_vae)")
        text_encoder = m.get("text_encoder", "")
        check(not text_encoder or _is_model_dir(text_encoder), "model.text_encoder", text_encoder,
              "must be empty (a text tower trained jointly) or a trained CLIP workdir")


def build(config, *, mesh: Mesh | None = None) -> Task:
    """The `Task` of `config.model.name`. `mesh` (default: all devices, one data axis) is where
    a frozen VAE is placed, replicated.

    Raises:
      UserError: see `validate` and each builder.
    """
    validate(config)
    name = config.model.name
    if name == "dit":
        return build_dit(config, mesh=mesh)
    if name == "unet":
        return build_unet(config)
    if name == "vae":
        return build_vae(config)
    if name == "video_vae":
        return build_video_vae(config)
    if name == "video_dit":
        return build_video_dit(config, mesh=mesh)
    return build_clip(config)


# --------------------------------------------------------------------------- shared helpers

def module_kwargs(cls: type, section: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The entries of a config section that are attributes of the Linen class `cls` (lists from a
    JSON round trip back to tuples, dtype names to dtypes), updated with `extra`."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    out = {}
    for key, value in dict(section).items():
        if key not in fields:
            continue
        if key in ("dtype", "param_dtype"):
            value = DTYPES[value]
        elif isinstance(value, (list, tuple)):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        out[key] = value
    return {**out, **extra}


def to_uint8(x: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 [0, 255] (`round((x + 1) * 127.5)`, clipped), inside jit."""
    return jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5).astype(jnp.uint8)


def _replicated(tree: Any, mesh: Mesh | None) -> Any:
    mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _image_inputs(example):
    return {"image": example["image"], "label": np.int32(example["label"])}


def _video_inputs(example):
    return {"video": example["video"], "label": np.int32(example["labels"][0])}


def _source(config, split: str):
    """`config.data.dataset` for `split`; Moving MNIST takes data.num_frames / image_size /
    num_examples / num_digits; a TFDS dataset is read from data.data_dir (empty / absent: TFDS's
    default folder, $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    from genjax.data import sources

    d = config.data
    if d.dataset == "moving_mnist":
        return sources.make_source("moving_mnist", split=split, num_frames=d.num_frames,
                                   image_size=d.image_size, num_examples=d.num_examples,
                                   num_digits=d.get("num_digits", 1), seed=config.seed)
    data_dir = d.get("data_dir", "") or None
    return sources.make_source(d.dataset, split=split, **({"data_dir": data_dir} if data_dir else {}))


def _pixel_transforms(config, source, extra=()):
    """uint8 pixels -> [-1, 1] at data.image_size, then `extra`.

    data.crop "resize" (default): resized (bilinear, aspect not kept) to image_size x image_size
    when the source's size differs; "adm_center": `transforms.adm_center_crop` (ADM / DiT: BOX
    halvings, BICUBIC to the short side, central square), for sources of any image size.
    data.random_flip (default False): a horizontal flip with probability 0.5 (DiT `train.py`),
    the same for every frame of a video.
    """
    from genjax.data import transforms

    first = source[0]
    key = "video" if "video" in first else "image"
    size = config.data.image_size
    if config.data.get("crop", "resize") == "adm_center":
        out = [transforms.AdmCenterCrop(size, keys=(key,))]
    else:
        out = [] if first[key].shape[-3:-1] == (size, size) else [transforms.Resize(size, keys=(key,))]
    if config.data.get("random_flip", False):
        out.append(transforms.RandomFlip(0.5, keys=(key,)))
    return (*out, transforms.ToFloat(keys=(key,)), *extra)


def _dataset(config, source, transforms, *, shard_index=None, shard_count=None, **kw):
    from genjax.data import pipeline

    return pipeline.make_dataset(source, batch_size=config.data.batch_size, seed=config.seed,
                                 transforms=transforms, shard_index=shard_index,
                                 shard_count=shard_count, **kw)


def _pixel_data(config):
    """`make_data` for pixel batches: images `{"image", "label"}` or videos `{"video", "label"}`,
    float32 in [-1, 1]."""
    def make_data(workdir, shard_index=None, shard_count=None):
        del workdir
        source = _source(config, config.data.split)
        inputs = _video_inputs if config.data.dataset == "moving_mnist" else _image_inputs
        # Looked up at call time (tests replace `_image_inputs` to feed NaN images).
        return _dataset(config, source, _pixel_transforms(config, source, (inputs,)),
                        shard_index=shard_index, shard_count=shard_count)
    return make_data


def fixed_examples(config, num: int, split: str = "test") -> dict[str, np.ndarray]:
    """The first `num` examples of `split` as float32 [-1, 1] pixels (+ int32 labels), in order."""
    source = _source(config, split)
    inputs = _video_inputs if config.data.dataset == "moving_mnist" else _image_inputs
    ds = _dataset(config, source, _pixel_transforms(config, source, (inputs,)), shuffle=False,
                  shard_index=0, shard_count=1, num_epochs=1, drop_remainder=False)
    batches, have = [], 0
    for batch in ds:
        batches.append(batch)
        have += len(batch["label"])
        if have >= num:
            break
    return {k: np.concatenate([b[k] for b in batches])[:num] for k in batches[0]}


# --------------------------------------------------------------------------- frozen VAEs

def load_frozen(path: str, *, mesh: Mesh | None = None, family: str = "vae"):
    """`(module, params)` of a frozen autoencoder: a trained workdir (`genjax train` with
    model.name = family, its EMA params) or, for family "vae", a `genjax convert --model vae`
    folder. Params are replicated over `mesh`.

    Raises:
      UserError: `path` holds neither, or a model of another family.
    """
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    if "family" in saved:  # a `genjax convert` folder
        check(saved["family"] == family, f"model.{family}", path,
              f"is a converted {saved['family']!r} model, not a {family!r}")
        from genjax import convert

        module, params = convert.load_converted(path)
    else:
        name = saved.get("model", {}).get("name")
        check(name == family, f"model.{family}", path, f"was trained with model.name={name!r}, not {family!r}")
        _, task, params = restore(path, devices=None if mesh is None else list(mesh.devices.flat))
        module = task.module
    return module, _replicated(nn.meta.unbox(params), mesh)


# --------------------------------------------------------------------------- diffusion: dit, unet

def _diffusion_task(config, module, init_params, denoise, *, x_shape, make_data,
                    encode=None, decode=None, conditional=True) -> Task:
    """Diffusion training and sampling around `denoise(params, x_t, t, y, rng | None) -> output`.

    loss_fn: `losses.diffusion_loss` (Ho et al. 2020 L_simple; + Improved-DDPM VLB with
    model.learn_sigma) on x0 = `batch["image"]` (B, *x_shape) in [-1, 1], or `encode(batch, rng)`
    latents, with labels `batch["label"]` (B,) int32 when conditional.
    sample_fn(params, rng, labels=None, trajectory=False) -> uint8 (N, H, W, C) [and uint8
    (steps + 1, N, H, W, C) with trajectory]: `samplers.sample` (eval.sampler,
    eval.num_sampling_steps) with classifier-free guidance (`guidance.cfg_denoiser`, scale
    eval.cfg_scale, null class = model.num_classes) for labels (N,) int32, default 0, 1, ...,
    num_classes - 1, 0, ... (N = eval.num_samples); latents are decoded by `decode`. Guidance
    applies to the first eval.guide_channels prediction channels (default 0 = all C; DiT's
    release guides 3 of the 4 latent channels), the rest come from the conditional half, as
    DiT's `forward_with_cfg`. With learn_sigma, the DDPM sampler draws with the learned variance
    (`variance_type="learned_range"`, Nichol & Dhariwal 2021 eq. 15; DiT's sampler); DDIM and the
    ODE samplers ignore the variance channels.
    """
    from genjax.diffusion import guidance, losses, samplers, schedules

    m, d, e = config.model, config.diffusion, config.eval
    schedule = schedules.make(d.schedule, d.num_timesteps, prediction_type=d.prediction_type)
    channels = x_shape[-1]
    learn_sigma = bool(m.get("learn_sigma", False))
    num_classes = int(m.num_classes)

    def loss_fn(params, batch, rng):
        model_rng, loss_rng = jax.random.split(rng)
        x0 = batch["image"] if encode is None else encode(batch, jax.random.fold_in(rng, 2))

        def denoise_fn(x_t, t, **cond):
            return denoise(params, x_t, t, cond.get("y"), model_rng)

        cond = {"y": batch["label"]} if conditional else None
        return losses.diffusion_loss(denoise_fn, x0, loss_rng, schedule=schedule, cond=cond,
                                     weighting=d.weighting, learn_sigma=learn_sigma)

    default_labels = jnp.arange(e.num_samples, dtype=jnp.int32) % max(num_classes, 1)
    learned_variance = learn_sigma and e.sampler == "ddpm"

    @functools.partial(jax.jit, static_argnames=("trajectory",))
    def sample_fn(params, rng, labels=default_labels, trajectory=False):
        def denoise_fn(x_t, t, y=None):
            return denoise(params, x_t, t, y, None)

        if conditional:
            model = guidance.cfg_denoiser(denoise_fn, e.cfg_scale, null_cond={"y": num_classes},
                                          guide_channels=int(e.get("guide_channels", 0)) or channels)
            cond = {"y": labels}
        else:
            model, cond = denoise_fn, None
        keep = 2 * channels if learned_variance else channels  # [prediction, v] or prediction

        def prediction(x_t, t, **c):
            return model(x_t, t, **c)[..., :keep]

        noise_rng, loop_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, (labels.shape[0], *x_shape))
        out = samplers.sample(prediction, noise, schedule=schedule, sampler=e.sampler,
                              num_steps=e.num_sampling_steps, rng=loop_rng, cond=cond,
                              variance_type="learned_range" if learned_variance else "fixed_small",
                              return_trajectory=trajectory)
        if decode is not None:
            out = (decode(out[0]), jax.lax.map(decode, out[1])) if trajectory else decode(out)
        return jax.tree.map(to_uint8, out)

    return Task(module, init_params, loss_fn, sample_fn, make_data, encode=encode)


def build_dit(config, *, mesh: Mesh | None = None) -> Task:
    """DiT (`genjax.models.dit.DiT`, config.model holds its attributes), class-conditional with
    label dropout (model.class_dropout_prob) and null class model.num_classes.

    Pixel space (model.vae empty): x0 = images (B, S, S, data.channels), S = data.image_size.
    Latent space (model.vae = a VAE workdir or converted folder, frozen): x0 = VAE latents
    `(z - shift_factor) * scaling_factor`, z ~ q(z | x) drawn with the step's rng:
      data.latents = "on_the_fly": the batch's images are encoded inside the jitted train step;
      data.latents = "cache": the posterior mean and std are computed once into
        WORKDIR/latents/{split}.array_record (`latent_cache.ensure`) and the batch carries them.
    Both give the same latents for the same examples and rng (tests/train/test_tasks.py).
    Samples are decoded by the VAE. See `_diffusion_task` for loss_fn and sample_fn.
    """
    from genjax.models import dit

    m = config.model
    size = config.data.image_size
    vae_path = m.get("vae", "")
    if vae_path:
        vae_module, vae_params = load_frozen(vae_path, mesh=mesh)
        f = vae_module.downsample_factor
        check(size % f == 0, "data.image_size", size, f"must be divisible by the VAE's downsampling factor {f}")
        x_shape = (size // f, size // f, vae_module.latent_channels)
    else:
        x_shape = (size, size, config.data.channels)
    module = dit.DiT(**module_kwargs(dit.DiT, m, in_channels=x_shape[-1]))
    check(x_shape[0] % module.patch_size == 0, "model.patch_size", module.patch_size,
          f"must divide the model's input side {x_shape[0]}")

    def init_params(key):
        x = jnp.zeros((1, *x_shape), jnp.float32)
        return module.init(key, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]

    def denoise(params, x_t, t, y, rng):
        if rng is None:
            return module.apply({"params": params}, x_t, t, y).astype(jnp.float32)
        return module.apply({"params": params}, x_t, t, y, train=True,
                            rngs={"dropout": rng}).astype(jnp.float32)

    if not vae_path:
        return _diffusion_task(config, module, init_params, denoise, x_shape=x_shape,
                               make_data=_pixel_data(config))

    cached = config.data.get("latents", "on_the_fly") == "cache"
    scale, shift = vae_module.scaling_factor, vae_module.shift_factor

    def encode(batch, rng):
        if cached:  # DiagonalGaussian.sample, exactly as encode_latents does it
            eps = jax.random.normal(rng, batch["mean"].shape, jnp.float32)
            return (batch["mean"] + batch["std"] * eps - shift) * scale
        return vae_module.apply({"params": vae_params}, batch["image"], rng,
                                method=vae_module.encode_latents).astype(jnp.float32)

    def decode(z):
        return vae_module.apply({"params": vae_params}, z, method=vae_module.decode_latents)

    make_data = _pixel_data(config)
    if cached:
        make_data = functools.partial(_cached_latent_data, config, vae_module, vae_params)
    return _diffusion_task(config, module, init_params, denoise, x_shape=x_shape,
                           make_data=make_data, encode=encode, decode=decode)


def _cached_latent_data(config, vae_module, vae_params, workdir, shard_index=None, shard_count=None):
    """Batches `{"mean", "std": float32 (B, h, w, c), "label": int32 (B,)}` from the latent cache
    of `config.data.split` in WORKDIR/latents (computed on first use)."""
    from genjax.data import latent_cache, pipeline

    source = _source(config, config.data.split)

    @jax.jit
    def posterior(x):
        q = vae_module.apply({"params": vae_params}, x, method=vae_module.encode)
        return q.mean, q.std

    def compute():
        ds = pipeline.make_dataset(source, batch_size=CACHE_BATCH, shuffle=False, num_epochs=1,
                                   drop_remainder=False, shard_index=0, shard_count=1,
                                   transforms=_pixel_transforms(config, source, (_image_inputs,)))
        for batch in ds:
            mean, std = posterior(batch["image"])
            yield {"mean": np.asarray(mean), "std": np.asarray(std), "label": batch["label"]}

    meta = {"vae": os.path.abspath(config.model.vae), "dataset": config.data.dataset,
            "split": config.data.split, "image_size": config.data.image_size}
    # Non-default preprocessing is part of what the cache was computed from (a flip is drawn once
    # per example when the cache is filled, as the feature-caching DiT ports fast-DiT / LightningDiT do).
    meta.update({k: config.data[k] for k, default in (("crop", "resize"), ("random_flip", False))
                 if config.data.get(k, default) != default})
    cache = latent_cache.ensure(os.path.join(workdir, "latents"), config.data.split, meta=meta,
                                compute=compute)
    return _dataset(config, cache, (), shard_index=shard_index, shard_count=shard_count)


def build_unet(config) -> Task:
    """Pixel-space DDPM U-Net (`genjax.models.unet.UNet`; config.model holds its attributes).

    model.num_classes > 0: a learned class table with num_classes + 1 rows (the last is the null
    class); labels are replaced by the null class with probability model.class_dropout_prob in
    training (Ho & Salimans 2022), and samples use classifier-free guidance. 0: unconditional.
    See `_diffusion_task` for loss_fn and sample_fn.
    """
    from genjax.models import unet

    m = config.model
    size, channels = config.data.image_size, config.data.channels
    num_classes = int(m.num_classes)
    conditional = num_classes > 0
    module = unet.UNet(**module_kwargs(
        unet.UNet, m, sample_size=size, in_channels=channels, out_channels=channels,
        num_class_embeds=num_classes + 1 if conditional else None))
    p_drop = float(m.get("class_dropout_prob", 0.0))

    def init_params(key):
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if conditional else None
        return module.init(key, x, jnp.zeros((1,), jnp.int32), y)["params"]

    def denoise(params, x_t, t, y, rng):
        if rng is None:
            return module.apply({"params": params}, x_t, t, y).astype(jnp.float32)
        drop_rng, dropout_rng = jax.random.split(rng)
        if conditional and p_drop > 0:
            y = jnp.where(jax.random.uniform(drop_rng, y.shape) < p_drop, num_classes, y)
        return module.apply({"params": params}, x_t, t, y, train=True,
                            rngs={"dropout": dropout_rng}).astype(jnp.float32)

    return _diffusion_task(config, module, init_params, denoise, x_shape=(size, size, channels),
                           make_data=_pixel_data(config), conditional=conditional)


# --------------------------------------------------------------------------- autoencoders

def _autoencoder_task(config, module, x_shape, key) -> Task:
    """Shared by "vae" and "video_vae": `vae.vae_loss` (LDM: L1 reconstruction + kl_weight * KL)
    on `batch[key]` in [-1, 1], posterior sampled with the step's rng; metric `latent_std` (the
    std of the sampled latents: set the VAE's scaling_factor to about 1 / latent_std for a
    latent diffusion model, LDM Appendix D.1). sample_fn(params, rng, x=None) -> uint8 (2N,
    *x_shape): N test examples (eval.num_samples // 2, or `x` float in [-1, 1]) followed by their
    reconstructions (posterior mode)."""
    from genjax.models import vae

    m = config.model

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, *x_shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng):
        recon, posterior = module.apply({"params": params}, batch[key], rng)
        loss, metrics = vae.vae_loss(recon, batch[key], posterior, kl_weight=m.kl_weight, rec=m.rec)
        z = posterior.sample(rng)  # the same draw as inside apply (same rng, same shape)
        return loss, {**metrics, "latent_std": jnp.std(z)}

    examples = jnp.asarray(fixed_examples(config, max(config.eval.num_samples // 2, 1))[key])

    @jax.jit
    def sample_fn(params, rng, x=examples):
        del rng  # deterministic: the posterior mode
        recon, _ = module.apply({"params": params}, x, sample_posterior=False)
        return to_uint8(jnp.concatenate([x, recon.astype(jnp.float32)]))

    return Task(module, init_params, loss_fn, sample_fn, _pixel_data(config))


def build_vae(config) -> Task:
    """2D KL autoencoder (`genjax.models.vae.AutoencoderKL`; config.model holds its attributes
    and kl_weight, rec) on images (B, S, S, data.channels). See `_autoencoder_task`."""
    from genjax.models import vae

    size, channels = config.data.image_size, config.data.channels
    module = vae.AutoencoderKL(**module_kwargs(vae.AutoencoderKL, config.model, in_channels=channels,
                                               out_channels=channels))
    f = module.downsample_factor
    check(size % f == 0, "data.image_size", size, f"must be divisible by the downsampling factor {f}")
    return _autoencoder_task(config, module, (size, size, channels), "image")


def build_video_vae(config) -> Task:
    """Causal video KL autoencoder (`genjax.models.video_vae.VideoAutoencoderKL`) on Moving MNIST
    clips (B, T, S, S, 1), T = data.num_frames = 1 + k * temporal factor. See `_autoencoder_task`."""
    from genjax.models import video_vae

    d = config.data
    check(d.dataset == "moving_mnist", "data.dataset", d.dataset, "video_vae trains on moving_mnist")
    module = video_vae.VideoAutoencoderKL(**module_kwargs(
        video_vae.VideoAutoencoderKL, config.model, in_channels=d.channels, out_channels=d.channels))
    fs, ft = module.downsample_factor, module.temporal_downsample_factor
    check(d.image_size % fs == 0, "data.image_size", d.image_size, f"must be divisible by {fs}")
    check((d.num_frames - 1) % ft == 0, "data.num_frames", d.num_frames, f"must be 1 + k * {ft}")
    return _autoencoder_task(config, module, (d.num_frames, d.image_size, d.image_size, d.channels), "video")


# --------------------------------------------------------------------------- clip

def build_clip(config) -> Task:
    """CLIP / SigLIP (`genjax.models.clip.CLIP`; config.model holds its attributes) on MNIST
    digits (data.dataset "mnist_embedded", batch `{"image", "ids", "mask"}`) or Moving MNIST
    videos ("moving_mnist", `{"video", "ids", "mask"}`) paired with their captions ("digit N"),
    byte-tokenized (`tokenizer.ByteTokenizer`, model.context_length).

    loss_fn: `clip.clip_loss` (model.loss "clip") or `clip.siglip_loss` ("siglip") over the
    global batch; metric `logit_scale`. No samples; evaluate(params) -> {"zero_shot_accuracy"}
    on eval.num_samples test examples with the prompts "digit 0" ... "digit 9"
    (`clip.zero_shot_accuracy`, Radford et al. 2021 Sec. 3.1.2; chance 0.1).
    """
    from genjax.models import clip, tokenizer

    d, m = config.data, config.model
    video = d.dataset == "moving_mnist"
    key = "video" if video else "image"
    module = clip.CLIP(**module_kwargs(clip.CLIP, m, in_channels=d.channels))
    if video:
        check(module.video_patch_size is not None, "model.video_patch_size", None,
              "a video CLIP needs a video tower")
    tok = tokenizer.ByteTokenizer()
    length = module.context_length

    def tokenize(example):
        ids, mask = tok.encode([str(example["caption"])], length)
        return {key: example[key], "ids": ids[0], "mask": mask[0]}

    def init_params(rng):
        kw = dict(ids=jnp.zeros((1, length), jnp.int32), mask=jnp.ones((1, length), bool),
                  images=jnp.zeros((1, *module.image_size, module.in_channels)))
        if module.video_patch_size is not None:
            kw["videos"] = jnp.zeros((1, *module.video_patch_size, module.in_channels))
        return module.init(rng, **kw)["params"]

    def loss_fn(params, batch, rng):
        del rng
        inputs = {"videos" if video else "images": batch[key]}
        out = module.apply({"params": params}, ids=batch["ids"], mask=batch["mask"], **inputs)
        if module.loss == "clip":
            loss = clip.clip_loss(out[key], out["text"], out["logit_scale"])
        else:
            loss = clip.siglip_loss(out[key], out["text"], out["logit_scale"], out["logit_bias"])
        return loss, {"logit_scale": jnp.exp(out["logit_scale"])}

    def make_data(workdir, shard_index=None, shard_count=None):
        del workdir
        source = _source(config, d.split)
        return _dataset(config, source, _pixel_transforms(config, source, (tokenize,)),
                        shard_index=shard_index, shard_count=shard_count)

    held_out = fixed_examples(config, config.eval.num_samples)

    def evaluate(params):
        acc = clip.zero_shot_accuracy({"params": params}, module, held_out[key], held_out["label"], tok)
        return {"zero_shot_accuracy": acc}

    return Task(module, init_params, loss_fn, None, make_data, evaluate=evaluate)


# --------------------------------------------------------------------------- video dit

def _frame_mask_probs(p: float) -> dict[str, float]:
    """`frame_conditioning.random_frame_mask` probs: no known frames with probability 1 - p, the
    other kinds sharing p in Open-Sora's proportions (`DEFAULT_PROBS`)."""
    from genjax.diffusion import frame_conditioning

    rest = {k: v for k, v in frame_conditioning.DEFAULT_PROBS.items() if k != "none"}
    total = sum(rest.values())
    return {"none": 1.0 - p, **{k: p * v / total for k, v in rest.items()}}


def build_video_dit(config, *, mesh: Mesh | None = None) -> Task:
    """Text-to-video latent diffusion: `genjax.models.video_dit.VideoDiT` (config.model holds its
    attributes) on the latents of a frozen video VAE, conditioned on the clips' captions.

    Latents: x0 = `(z - shift_factor) * latent_scale` of the video VAE in model.vae (a
    `video_vae` workdir, frozen EMA params; latent_scale = model.latent_scale, or the VAE's
    scaling_factor when 0), z ~ q(z | video) drawn with the step's rng inside the jitted step
    (LDM, Rombach et al. 2022, sec. 3 and appendix D.1): videos (B, T, S, S, C) in [-1, 1] ->
    (B, 1 + (T - 1) / ft, S / fs, S / fs, latent_channels).
    Text: captions ("digit N") byte-tokenized (`tokenizer.ByteTokenizer`, model.text_length
    tokens) and encoded by `clip.TextTransformer` (model.text: width, num_layers, num_heads),
    trained jointly, or, with model.text_encoder = a CLIP workdir, by that CLIP's frozen text
    tower; the DiT cross-attends to its hidden states `(B, L, Dt)` under text_mask (PixArt-alpha /
    Stable Diffusion use a frozen encoder's last hidden states). Params: `{"dit": VideoDiT
    params, "text": TextTransformer params}` (no "text" with a frozen encoder).

    loss_fn: `losses.diffusion_loss` (diffusion.schedule / prediction_type / weighting;
    model.learn_sigma adds the VLB) with the DiT's classifier-free text dropout
    (model.text_dropout_prob -> its learned null text, Ho & Salimans 2022). With
    diffusion.frame_condition_prob p > 0, a fraction p of the examples get known latent frames
    (`frame_conditioning.random_frame_mask`: first, first k, first + last, random) and the loss is
    `frame_conditioning.frame_conditioned_diffusion_loss` (Open-Sora v1.1).

    sample_fn(params, rng, prompts=None, num=None, trajectory=False, cfg_scale=None,
    num_steps=None, sampler=None, init_frames=None) -> uint8 videos (N, T, S, S, C) [and with
    trajectory the decoded x_t of every step, uint8 (num_steps + 1, N, T, S, S, C)]:
      prompts: list of str, cycled to N = num (default len(prompts)); default "digit 0" ...
        "digit 9" cycled to num or eval.num_samples. Tokenized outside jit.
      cfg_scale (default eval.cfg_scale; a traced value, any float reuses the compiled loop):
        `guidance.cfg_denoiser`, the unconditional half with the null text (force_drop_ids = 1).
      num_steps, sampler: default eval.num_sampling_steps / eval.sampler (`samplers.sample`).
      init_frames: optional uint8 (N, K, S, S, C) first frames, K = 1 + j * ft < T: encoded by the
        VAE (posterior mode) and kept as the first 1 + j latent frames
        (`frame_conditioning.frame_conditioned_sampling`: image-to-video with K = 1, extension
        otherwise); meaningful for a model trained with frame_condition_prob > 0.
    The sampler loop is one jitted function of (params, rng, ids, mask, cfg_scale[, known
    frames]), compiled once per (N, trajectory, num_steps, sampler, init_frames or not).

    Raises:
      UserError: data.dataset not moving_mnist; data.num_frames / image_size not fitting the VAE
        (T = 1 + k * ft, S divisible by fs); model.text_length < 2 or above a frozen CLIP's
        context_length; the latent grid not divisible by model.patch_size; in sample_fn, num < 1,
        prompts not a non-empty list of str, a non-finite cfg_scale, or init_frames of the wrong
        shape / dtype (before compiling).
    """
    import math

    from genjax.diffusion import frame_conditioning, guidance, losses, samplers, schedules
    from genjax.models import clip, tokenizer, video_dit

    d, m, diff, e = config.data, config.model, config.diffusion, config.eval
    check(d.dataset == "moving_mnist", "data.dataset", d.dataset, "video_dit trains on moving_mnist")
    vae_module, vae_params = load_frozen(m.vae, mesh=mesh, family="video_vae")
    if m.get("latent_scale", 0.0):
        vae_module = vae_module.clone(scaling_factor=float(m.latent_scale))
    fs, ft = vae_module.downsample_factor, vae_module.temporal_downsample_factor
    check(d.image_size % fs == 0, "data.image_size", d.image_size, f"must be divisible by the VAE's {fs}")
    check((d.num_frames - 1) % ft == 0, "data.num_frames", d.num_frames, f"must be 1 + k * {ft} (the VAE's)")
    x_shape = (1 + (d.num_frames - 1) // ft, d.image_size // fs, d.image_size // fs, vae_module.latent_channels)
    video_shape = (d.num_frames, d.image_size, d.image_size, d.channels)

    tok = tokenizer.ByteTokenizer()
    length = int(m.text_length)
    check(length >= 2, "model.text_length", length, "must be >= 2 (bos and eos)")
    frozen_text = bool(m.get("text_encoder", ""))
    if frozen_text:
        clip_module, clip_params = load_frozen(m.text_encoder, mesh=mesh, family="clip")
        check(length <= clip_module.context_length, "model.text_length", length,
              f"must be <= the CLIP's context_length {clip_module.context_length}")
        text_module, context_dim = clip_module, clip_module.text_width
    else:
        text_module = clip.TextTransformer(**module_kwargs(
            clip.TextTransformer, m.text, vocab_size=tok.vocab_size, context_length=length,
            dtype=DTYPES[m.get("dtype", "float32")]))
        context_dim = text_module.width
    module = video_dit.VideoDiT(**module_kwargs(video_dit.VideoDiT, m, in_channels=x_shape[-1], context_dim=context_dim,
                                                num_classes=0))
    check(all(s % p == 0 for s, p in zip(x_shape[:3], module.patch_size)), "model.patch_size",
          tuple(module.patch_size), f"must divide the latent grid {x_shape[:3]}")
    schedule = schedules.make(diff.schedule, diff.num_timesteps, prediction_type=diff.prediction_type)
    channels, learn_sigma = x_shape[-1], module.learn_sigma
    frame_prob = float(diff.get("frame_condition_prob", 0.0))
    check(0.0 <= frame_prob <= 1.0, "diffusion.frame_condition_prob", frame_prob, "must be in [0, 1]")

    def init_params(key):
        dit_key, text_key = jax.random.split(key)
        text = jnp.zeros((1, length, context_dim), jnp.float32)
        params = {"dit": module.init(dit_key, jnp.zeros((1, *x_shape), jnp.float32), jnp.zeros((1,), jnp.int32),
                                     text=text, text_mask=jnp.ones((1, length), bool))["params"]}
        if not frozen_text:
            ids = jnp.zeros((1, length), jnp.int32)
            params["text"] = text_module.init(text_key, ids, jnp.ones((1, length), bool))["params"]
        return params

    def encode_text(params, ids, mask):
        """ids, mask (B, L) -> hidden states (B, L, Dt) float32."""
        if frozen_text:
            hidden = text_module.apply({"params": clip_params}, ids, mask, method=lambda mdl, i, k: mdl.text(i, k)[0])
        else:
            hidden = text_module.apply({"params": params["text"]}, ids, mask)[0]
        return hidden.astype(jnp.float32)

    def encode(batch, rng):
        return vae_module.apply({"params": vae_params}, batch["video"], rng,
                                method=vae_module.encode_latents).astype(jnp.float32)

    def decode(z):
        return vae_module.apply({"params": vae_params}, z, method=vae_module.decode_latents)

    def loss_fn(params, batch, rng):
        vae_rng, model_rng, loss_rng, mask_rng = jax.random.split(rng, 4)
        x0 = encode(batch, vae_rng)
        cond = {"text": encode_text(params, batch["ids"], batch["mask"]), "text_mask": batch["mask"]}

        def denoise_fn(x_t, t, **c):
            return module.apply({"params": params["dit"]}, x_t, t, **c, train=True,
                                rngs={"dropout": model_rng}).astype(jnp.float32)

        kw = dict(schedule=schedule, cond=cond, weighting=diff.weighting, learn_sigma=learn_sigma)
        if frame_prob == 0:
            return losses.diffusion_loss(denoise_fn, x0, loss_rng, **kw)
        frame_mask = frame_conditioning.random_frame_mask(mask_rng, x0.shape[0], x0.shape[1],
                                                          probs=_frame_mask_probs(frame_prob))
        return frame_conditioning.frame_conditioned_diffusion_loss(denoise_fn, x0, loss_rng,
                                                                   frame_mask=frame_mask, **kw)

    def tokenize(example):
        ids, mask = tok.encode([str(example["caption"])], length)
        return {"video": example["video"], "ids": ids[0], "mask": mask[0]}

    def make_data(workdir, shard_index=None, shard_count=None):
        del workdir
        source = _source(config, d.split)
        return _dataset(config, source, _pixel_transforms(config, source, (tokenize,)),
                        shard_index=shard_index, shard_count=shard_count)

    @functools.partial(jax.jit, static_argnames=("trajectory", "num_steps", "sampler"))
    def generate(params, rng, ids, mask, cfg_scale, init_frames=None, *, trajectory, num_steps, sampler):
        def denoise_fn(x_t, t, **c):
            return module.apply({"params": params["dit"]}, x_t, t, **c).astype(jnp.float32)

        guided = guidance.cfg_denoiser(denoise_fn, cfg_scale, null_cond={"force_drop_ids": 1})

        def prediction(x_t, t, **c):
            return guided(x_t, t, **c)[..., :channels]  # learn_sigma: DDIM / ODE samplers ignore v

        n = ids.shape[0]
        cond = {"text": encode_text(params, ids, mask), "text_mask": mask,
                "force_drop_ids": jnp.zeros((n,), jnp.int32)}
        noise_rng, loop_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, (n, *x_shape))
        kw = dict(denoise_fn=prediction, cond=cond, known=None)
        if init_frames is not None:
            z = vae_module.apply({"params": vae_params}, init_frames.astype(jnp.float32) / 127.5 - 1,
                                 method=vae_module.encode_latents).astype(jnp.float32)
            k = z.shape[1]
            x_known = jnp.concatenate([z, jnp.zeros((n, x_shape[0] - k, *x_shape[1:]))], axis=1)
            frame_mask = jnp.broadcast_to(jnp.arange(x_shape[0]) < k, (n, x_shape[0]))
            kw = frame_conditioning.frame_conditioned_sampling(prediction, x_known, frame_mask, cond)
        out = samplers.sample(kw["denoise_fn"], noise, schedule=schedule, sampler=sampler, num_steps=num_steps,
                              rng=loop_rng, cond=kw["cond"], known=kw["known"], return_trajectory=trajectory)
        if trajectory:
            out = (decode(out[0]), jax.lax.map(decode, out[1]))
        else:
            out = decode(out)
        return jax.tree.map(to_uint8, out)

    def sample_fn(params, rng, prompts=None, num=None, trajectory=False, cfg_scale=None, num_steps=None,
                  sampler=None, init_frames=None):
        if num is None:
            num = len(prompts) if prompts else e.num_samples
        check(isinstance(num, int) and num >= 1, "num", num, "must be an int >= 1")
        prompts = [f"digit {i}" for i in range(10)] if prompts is None else prompts
        check(isinstance(prompts, (list, tuple)) and len(prompts) > 0, "prompts", prompts,
              "must be a non-empty list of str")
        ids, mask = tok.encode([prompts[i % len(prompts)] for i in range(num)], length)
        cfg_scale = e.cfg_scale if cfg_scale is None else cfg_scale
        check(math.isfinite(float(cfg_scale)), "cfg_scale", cfg_scale, "must be a finite number")
        if init_frames is not None:
            init_frames = np.asarray(init_frames)
            k = init_frames.shape[1] if init_frames.ndim == 5 else None
            check(init_frames.dtype == np.uint8 and init_frames.ndim == 5 and init_frames.shape[0] == num
                  and init_frames.shape[2:] == video_shape[1:] and (k - 1) % ft == 0 and k < video_shape[0],
                  "init_frames", f"{init_frames.dtype}{tuple(init_frames.shape)}",
                  f"must be uint8 (N={num}, 1 + j * {ft} < {video_shape[0]}, {', '.join(map(str, video_shape[1:]))})")
        return generate(params, rng, jnp.asarray(ids), jnp.asarray(mask), jnp.float32(cfg_scale), init_frames,
                        trajectory=bool(trajectory), num_steps=int(num_steps or e.num_sampling_steps),
                        sampler=str(sampler or e.sampler))

    return Task(module, init_params, loss_fn, sample_fn, make_data, encode=encode)


# --------------------------------------------------------------------------- restore

def restore(workdir: str, *, devices=None, eval_overrides: Mapping[str, Any] | None = None):
    """`(config, task, ema_params)` of the model trained in `workdir` (its config.json and newest
    checkpoint, restored onto a data-parallel mesh of `devices`, default all, whatever mesh it was
    trained on). `eval_overrides` replaces fields of `config.eval` (the sampler settings that
    `task.sample_fn` uses) before the task is built.

    Raises:
      UserError: `workdir` holds no config.json or no finished checkpoint.
    """
    import ml_collections

    from genjax.parallel import mesh as mesh_lib
    from genjax.train import checkpoint, state as state_lib

    cfg_path = os.path.join(workdir, "config.json")
    check(os.path.isfile(cfg_path), "--workdir", workdir, "holds no trained model (no config.json)")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if eval_overrides:
        config.eval.update(dict(eval_overrides))
    manager = checkpoint.make_manager(workdir, config.ckpt)
    try:
        check(manager.latest_step() is not None, "--workdir", workdir,
              "holds no checkpoint (no trained model)")
        mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
        task = build(config, mesh=mesh)
        tx, _ = state_lib.make_optimizer(config.optim, config.num_steps)
        abstract, _ = state_lib.abstract_train_state(task.init_params, tx, seed=config.seed, mesh=mesh)
        state = checkpoint.restore(manager, abstract)
    finally:
        manager.close()
    return config, task, state.ema_params
