"""The one generation path of every diffusion task, and the image-diffusion `Task` (dit, unet).

`generate` is the sampler call of every task: noise -> classifier-free guidance
(`guidance.cfg_denoiser`) -> optional frame conditioning (`frame_conditioning.
frame_conditioned_sampling`, known latent frames) -> `samplers.sample` (one compiled loop) ->
the autoencoder's decoder -> uint8. The image tasks (`image_task`) and the video task
(`tasks/video_dit.py`) only say what the condition and the null condition are.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from genjax.errors import UserError, check
from genjax.tasks import Task


# The fields of config.diffusion that make_schedule, loss_options and sample_shift read (the
# last five for flow schedules only), and the config.eval fields of a diffusion task
# (tasks.EVAL_KEYS plus guide_channels, read by image_task).
DIFFUSION_KEYS = ("schedule", "num_timesteps", "prediction_type", "weighting", "timestep_sampling",
                  "logit_mean", "logit_std", "flow_shift", "shift_base_tokens")
EVAL_KEYS = ("guide_channels",)
# config.diffusion's flow fields and the values a variance-preserving schedule needs.
FLOW_DEFAULTS = dict(timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, flow_shift=1.0, shift_base_tokens=0)


def make_schedule(config):
    """The `schedules.Schedule` of config.diffusion (schedule, num_timesteps, prediction_type)."""
    from genjax.diffusion import schedules

    d = config.diffusion
    return schedules.make(d.schedule, d.num_timesteps, prediction_type=d.prediction_type)


def _flow_fields(config) -> dict[str, Any]:
    d = config.diffusion
    return {k: d.get(k, v) for k, v in FLOW_DEFAULTS.items()}


def validate(config) -> None:
    """Check the training objective of config.diffusion before anything is built.

    The objective is chosen by diffusion.schedule: "flow" (with prediction_type "flow") trains
    rectified flow / flow matching (`losses.flow_matching_loss`: velocity target, Liu et al. 2023,
    Lipman et al. 2023), with timestep_sampling "uniform" or "logit_normal" (SD3, Esser et al.
    2024, eq. 19: logit_mean, logit_std) and the SD3 timestep shift flow_shift, scaled per
    example by sqrt(tokens / shift_base_tokens) when shift_base_tokens > 0 (`schedules.
    flow_shift_for`; the same shift at sampling); any other schedule trains eps / x0 / v.

    Raises:
      UserError: a flow schedule with model.learn_sigma, weighting "min_snr" or eval.sampler
        "ddpm"; a variance-preserving schedule with a flow field set to a non-default value; an
        unknown timestep_sampling, logit_std <= 0, flow_shift <= 0, shift_base_tokens < 0; and
        `schedules.make`'s errors (a prediction_type that does not go with the schedule).
    """
    from genjax.diffusion import losses, schedules

    try:
        schedule = make_schedule(config)
    except UserError as e:
        raise UserError(f"diffusion.{e}") from None
    f = _flow_fields(config)
    if not schedule.is_flow:
        for key, default in FLOW_DEFAULTS.items():
            check(f[key] == default, f"diffusion.{key}", f[key],
                  f"is for diffusion.schedule='flow' (must be {default!r} with {config.diffusion.schedule!r})")
        return
    check(not config.model.get("learn_sigma", False), "model.learn_sigma", True,
          "must be false with diffusion.schedule='flow' (flow matching has no VLB)")
    check(config.diffusion.get("weighting", "none") == "none", "diffusion.weighting", config.diffusion.weighting,
          "must be 'none' with diffusion.schedule='flow'")
    check(config.eval.get("sampler") != "ddpm", "eval.sampler", "ddpm",
          "needs a variance-preserving schedule; use euler, heun, ddim or dpmpp_2m with 'flow'")
    check(f["timestep_sampling"] in losses.TIMESTEP_SAMPLINGS, "diffusion.timestep_sampling",
          f["timestep_sampling"], f"must be one of {losses.TIMESTEP_SAMPLINGS}")
    check(isinstance(f["logit_std"], (int, float)) and f["logit_std"] > 0, "diffusion.logit_std",
          f["logit_std"], "must be > 0")
    try:
        schedules.flow_shift_for(1, flow_shift=f["flow_shift"], shift_base_tokens=f["shift_base_tokens"])
    except UserError as e:
        raise UserError(f"diffusion.{e}") from None


def loss_options(config, num_tokens: Any = None) -> dict[str, Any]:
    """Keyword arguments of `losses.diffusion_loss` from config.diffusion: weighting and, for a
    flow schedule, timestep_sampling, logit_mean, logit_std and shift (`schedules.flow_shift_for`
    of `num_tokens`, the spacetime tokens of each example: a number or a (B,) array)."""
    from genjax.diffusion import schedules

    out = dict(weighting=config.diffusion.get("weighting", "none"))
    if config.diffusion.schedule != "flow":
        return out
    f = _flow_fields(config)
    shift = schedules.flow_shift_for(num_tokens, flow_shift=float(f["flow_shift"]),
                                     shift_base_tokens=int(f["shift_base_tokens"]))
    return out | dict(timestep_sampling=f["timestep_sampling"], logit_mean=float(f["logit_mean"]),
                      logit_std=float(f["logit_std"]), shift=shift)


def sample_shift(config, num_tokens: int) -> float:
    """The samplers' flow_shift for samples of `num_tokens` spacetime tokens (the training shift
    of an example of that size, `loss_options`); 1.0 for variance-preserving schedules."""
    return float(loss_options(config, num_tokens).get("shift", 1.0))


def sampling_options(config, sampler: str | None, num_steps: int | None, cfg_scale: float | None):
    """`(sampler, num_steps, cfg_scale)` with None replaced by config.eval's
    (sampler, num_sampling_steps, cfg_scale).

    Raises:
      UserError: an unknown sampler, num_steps outside [1, diffusion.num_timesteps], a non-finite
        cfg_scale.
    """
    from genjax.diffusion import samplers

    e = config.eval
    sampler = str(e.sampler if sampler is None else sampler)
    num_steps = int(e.num_sampling_steps if num_steps is None else num_steps)
    cfg_scale = float(e.cfg_scale if cfg_scale is None else cfg_scale)
    check(sampler in samplers.SAMPLERS, "sampler", sampler, f"must be one of {samplers.SAMPLERS}")
    n = int(config.diffusion.num_timesteps)
    check(1 <= num_steps <= n, "num_steps", num_steps, f"must be in [1, {n}]")
    check(math.isfinite(cfg_scale), "cfg_scale", cfg_scale, "must be a finite number")
    return sampler, num_steps, cfg_scale


def generate(denoise: Callable, shape: tuple[int, ...], rng: jax.Array, *, schedule, cond: dict | None,
             null_cond: dict | None, cfg_scale: Any, sampler: str, num_steps: int, keep: int,
             guide_channels: int | None = None, variance_type: str = "fixed_small",
             known: tuple[jax.Array, jax.Array] | None = None, decode: Callable | None = None,
             flow_shift: float = 1.0, noise: jax.Array | None = None) -> jax.Array:
    """Samples as uint8, inside jit: x_T = N(0, I) of `shape` drawn with `split(rng)[0]` (or the
    given `noise`), the sampler's own randomness from `split(rng)[1]`.

    Args:
      denoise: `denoise(x_t, t, **cond) -> prediction` (float32; [prediction, v] with learn_sigma).
      cond, null_cond: the condition and the guidance's null condition (`guidance.cfg_denoiser`,
        Ho & Salimans 2022 eq. 6, guided on the first `guide_channels` channels); no guidance
        when null_cond is None.
      keep: prediction channels passed to the sampler (2C for DDPM's learned variance, else C).
      known: `(x_known (N, T, ...), frame_mask (N, T))`, latent frames kept fixed
        (`frame_conditioning.frame_conditioned_sampling`: image-to-video, extension).
      decode: latents -> pixels in [-1, 1] (None: the samples are pixels).
      flow_shift: the SD3 timestep shift of a flow schedule's sampling grid (`sample_shift`).
      noise: x_T float `shape` to start from instead of drawing it (to reproduce a reference
        pipeline's initial latents, e.g. diffusers' `latents=`); None draws it.
    Returns:
      uint8 `(N, ...)` in [0, 255] (`media.to_uint8`).
    """
    from genjax.diffusion import frame_conditioning, guidance, samplers
    from genjax.io import media

    model = denoise
    if null_cond is not None:
        model = guidance.cfg_denoiser(denoise, cfg_scale, null_cond=null_cond, guide_channels=guide_channels)

    def prediction(x_t, t, **c):
        return model(x_t, t, **c)[..., :keep]

    noise_rng, loop_rng = jax.random.split(rng)
    if noise is not None:
        check(tuple(noise.shape) == tuple(shape), "noise.shape", tuple(noise.shape), f"must be {tuple(shape)}")
    noise = jax.random.normal(noise_rng, shape) if noise is None else jnp.asarray(noise, jnp.float32)
    kw = dict(denoise_fn=prediction, cond=cond, known=None)
    if known is not None:
        kw = frame_conditioning.frame_conditioned_sampling(prediction, known[0], known[1], cond)
    out = samplers.sample(kw["denoise_fn"], noise, schedule=schedule, sampler=sampler, num_steps=num_steps,
                          rng=loop_rng, cond=kw["cond"], known=kw["known"], variance_type=variance_type,
                          flow_shift=flow_shift)
    return media.to_uint8(out if decode is None else decode(out))


def latent_fns(config, vae_module, vae_params, vae_path: str, key: str, inputs=None, meta=None):
    """`(encode, decode, make_data)` of a latent diffusion task on a frozen autoencoder (LDM,
    Rombach et al. 2022): x0 = `(z - shift_factor) * scaling_factor`, z ~ q(z | x) drawn with the
    step's rng, from `batch[key]` pixels encoded inside the step (data.latents "on_the_fly") or
    from the posterior mean and std of the latent cache (data.latents "cache",
    `recipes.latent_cache_data`; the same draw, `DiagonalGaussian.sample`). `inputs` turns an
    example into the batch fields (default `recipes.labelled_inputs`); `meta` adds to what the
    cache depends on. decode: latents -> pixels in [-1, 1]."""
    import os

    from genjax.data import recipes

    cached = config.data.get("latents", "on_the_fly") == "cache"
    scale, shift = vae_module.scaling_factor, vae_module.shift_factor

    def encode(batch, rng):
        if cached:
            eps = jax.random.normal(rng, batch["mean"].shape, jnp.float32)
            return (batch["mean"] + batch["std"] * eps - shift) * scale
        return vae_module.apply({"params": vae_params}, batch[key], rng,
                                method=vae_module.encode_latents).astype(jnp.float32)

    def decode(z):
        return vae_module.apply({"params": vae_params}, z, method=vae_module.decode_latents)

    if not cached:
        return encode, decode, recipes.pixel_data(config, inputs)

    meta = {"vae": os.path.abspath(vae_path), **(meta or {})}
    return encode, decode, recipes.latent_cache_data(config, posterior_fn(vae_module, vae_params), meta=meta,
                                                     inputs=inputs)


def posterior_fn(vae_module, vae_params) -> Callable:
    """A frozen autoencoder's jitted posterior `x float [-1, 1] (B, ...) -> (mean, std)` (its
    `encode`'s DiagonalGaussian), for latent caches and packed pipelines; one compile per shape."""
    @jax.jit
    def posterior(x):
        q = vae_module.apply({"params": vae_params}, x, method=vae_module.encode)
        return q.mean, q.std
    return posterior


def packed_loss(config, schedule, denoise: Callable, conditions: Callable, *, latent=None) -> Callable:
    """`loss_fn(params, batch, rng)` of NaViT-packed training (data.packing; the batches of
    `recipes.packed_latent_data`): `losses.diffusion_loss` on the packed tokens with one time per
    example (padding out of the loss) and each example's own flow shift (`loss_options` of its
    token count, `schedules.flow_shift_for`).

    denoise: `(params, batch, x_t (S, L, P), t (S, M), rng, **cond) -> (S, L, P) float32`, the
      model's packed form. conditions: `(params, batch) -> dict` of per-slot conditions `(S, M, ...)`
      given to denoise as keywords (labels, text). latent: None (the tokens are x0, pixels) or
      `(C, scale, shift)`: each token holds its patch's `[mean C | std C]` of a frozen
      autoencoder's posterior, and x0 = `(mean + std * eps - shift) * scale` (LDM) with the step's rng.
    Metrics: the loss's, plus "examples", "tokens" (non-padding) per batch and "padding" (fraction),
    from which the trainer logs examples and tokens per second."""
    from genjax.diffusion import losses

    def loss_fn(params, batch, rng):
        latent_rng, model_rng, loss_rng = jax.random.split(rng, 3)
        seg, x0 = batch["segment_ids"], batch["tokens"]
        s, l, _ = x0.shape
        m = batch["example_index"].shape[1]
        if latent is not None:
            c, scale, shift = latent
            halves = x0.reshape(s, l, -1, 2 * c)  # (patch values, [mean C | std C])
            mean, std = halves[..., :c], halves[..., c:]
            x0 = ((mean + std * jax.random.normal(latent_rng, mean.shape) - shift) * scale).reshape(s, l, -1)

        def denoise_fn(x_t, t, **cond):
            return denoise(params, batch, x_t, t, model_rng, **cond)

        num_tokens = jnp.maximum(jnp.prod(batch["example_shape"], axis=-1), 1).astype(jnp.float32)  # (S, M)
        loss, metrics = losses.diffusion_loss(denoise_fn, x0, loss_rng, schedule=schedule, cond=conditions(params, batch),
                                              segment_ids=seg, max_per_seq=m, **loss_options(config, num_tokens))
        real = jnp.sum(seg > 0).astype(jnp.float32)
        return loss, {**metrics, "examples": jnp.sum(batch["example_index"] >= 0).astype(jnp.float32),
                      "tokens": real, "padding": 1 - real / (s * l)}
    return loss_fn


def image_task(config, module, init_params, denoise, *, x_shape, make_data, encode=None, decode=None,
               conditional=True, num_classes: int = 0, latent_factor: int = 1, size_multiple: int = 0) -> Task:
    """Diffusion training and sampling around `denoise(params, x_t, t, y, rng | None) -> output`.

    loss_fn: `losses.diffusion_loss` (Ho et al. 2020 L_simple; + Improved-DDPM VLB with
    model.learn_sigma; flow matching with diffusion.schedule "flow", `validate`) on x0 = `batch["image"]` (B, *x_shape) in [-1, 1], or `encode(batch, rng)`
    latents, with labels `batch["label"]` (B,) int32 when conditional.

    sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None,
    init_frames=None, height=None, width=None) -> uint8 (N, H, W, C): H, W default data.image_size;
    other sizes must be multiples of `size_multiple` pixels (0: none allowed), latents of
    (H, W) / `latent_factor`, each size with its own flow shift; cond = class labels (N,) int (default 0, 1, ...,
    num_classes - 1, 0, ... with N = eval.num_samples), with classifier-free guidance (null class
    = num_classes); latents are decoded by `decode`. Guidance applies to the first
    eval.guide_channels prediction channels (default 0 = all C; DiT's release guides 3 of the 4
    latent channels), the rest come from the conditional half, as DiT's `forward_with_cfg`. With
    learn_sigma, the DDPM sampler draws with the learned variance (`variance_type=
    "learned_range"`, Nichol & Dhariwal 2021 eq. 15; DiT's sampler); DDIM and the ODE samplers
    ignore the variance channels. The loop is compiled once per (N, size, sampler, num_steps); any
    cfg_scale reuses it.

    Raises (sample_fn, before compiling):
      UserError: labels outside [0, num_classes), init_frames given, a height / width the model
        does not take, or see `sampling_options`.
    """
    import numpy as np

    from genjax.diffusion import losses

    e = config.eval
    schedule = make_schedule(config)
    channels = x_shape[-1]
    learn_sigma = bool(getattr(module, "learn_sigma", False))
    guide_channels = int(e.get("guide_channels", 0)) or channels
    patch = getattr(module, "patch_size", 1)  # the DiT's tokens; a U-Net's "tokens" are its pixels
    num_tokens = math.prod(x_shape[:-1]) // patch ** (len(x_shape) - 1)
    loss_kw = loss_options(config, num_tokens)

    def loss_fn(params, batch, rng):
        model_rng, loss_rng = jax.random.split(rng)
        x0 = batch["image"] if encode is None else encode(batch, jax.random.fold_in(rng, 2))

        def denoise_fn(x_t, t, **cond):
            return denoise(params, x_t, t, cond.get("y"), model_rng)

        cond = {"y": batch["label"]} if conditional else None
        return losses.diffusion_loss(denoise_fn, x0, loss_rng, schedule=schedule, cond=cond,
                                     learn_sigma=learn_sigma, **loss_kw)

    @functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "shape"))
    def run(params, rng, labels, cfg_scale, *, sampler, num_steps, shape):
        def denoise_fn(x_t, t, y=None):
            return denoise(params, x_t, t, y, None)

        learned = learn_sigma and sampler == "ddpm"
        flow_shift = sample_shift(config, math.prod(shape[:-1]) // patch ** (len(shape) - 1))
        return generate(denoise_fn, (labels.shape[0], *shape), rng, schedule=schedule,
                        cond={"y": labels} if conditional else None,
                        null_cond={"y": num_classes} if conditional else None, cfg_scale=cfg_scale,
                        sampler=sampler, num_steps=num_steps, keep=2 * channels if learned else channels,
                        guide_channels=guide_channels,
                        variance_type="learned_range" if learned else "fixed_small", decode=decode,
                        flow_shift=flow_shift)

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None,
                  height=None, width=None):
        sampler, num_steps, cfg_scale = sampling_options(config, sampler, num_steps, cfg_scale)
        check(init_frames is None, "init_frames", "given", "is for video models")
        size = config.data.image_size
        for field, side in (("height", height), ("width", width)):
            ok = side is None or side == size or (size_multiple and side >= 1 and side % size_multiple == 0)
            check(ok, field, side, f"must be a multiple of {size_multiple} (the model's downsampling x patch)"
                  if size_multiple else f"must be the training size {size} (this model samples at one size)")
        shape = ((height or size) // latent_factor, (width or size) // latent_factor, channels)
        labels = np.arange(e.num_samples) % max(num_classes, 1) if cond is None else np.asarray(cond)
        check(labels.ndim == 1 and labels.size >= 1, "class_labels", labels.tolist(), "must give at least one label")
        if conditional:
            check(np.issubdtype(labels.dtype, np.integer) and bool(np.all((labels >= 0) & (labels < num_classes))),
                  "class_labels", labels.tolist(), f"must be ints in [0, {num_classes})")
        return run(params, rng, jnp.asarray(labels, jnp.int32), jnp.float32(cfg_scale),
                   sampler=sampler, num_steps=num_steps, shape=shape)

    return Task(module, init_params, loss_fn, sample_fn, make_data, encode=encode)
