"""Guidance: wrap a denoiser `denoise_fn(x_t, t, **cond) -> model_output` into a guided one.

Both wrappers return a callable with the same signature, so any sampler in `samplers.py` can use
a guided denoiser exactly as an unguided one:

  cfg_denoiser                  classifier-free guidance (Ho & Salimans 2022), with DiT's
                                partial-channel guidance and Lin et al. 2024's guidance rescale.
  classifier_guidance_denoiser  classifier guidance (Dhariwal & Nichol 2021, "ADM", Algorithm 2).

Shapes: x_t (B, ...) channels-last of any rank (images (B, H, W, C), videos (B, T, H, W, C),
tokens (B, L, D)); t a scalar or (B,); model_output (B, ..., C_out) with C_out >= C (C_out = 2C
for learned-variance models). Everything is pure JAX and jittable.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from genjax.diffusion import schedules
from genjax.errors import check

Denoiser = Callable[..., jax.Array]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _per_example(scale: Any, ndim: int) -> jax.Array:
    """A scalar or (B,) scale, reshaped to broadcast against a (B, ...) array of rank `ndim`."""
    scale = jnp.asarray(scale)
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def rescale_noise_cfg(guided: jax.Array, cond_out: jax.Array, guidance_rescale: Any) -> jax.Array:
    """Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Sec. 3.4, eqs. 15-16).

    guided_rescaled = guided * std(cond_out) / std(guided), with std per example over all non-batch
    dims (unbiased, ddof=1, as torch.std), then mixed:
    phi * guided_rescaled + (1 - phi) * guided. guided, cond_out: (B, ...) float; phi = guidance_rescale
    in [0, 1] (scalar). Returns guided's shape and dtype. Equals diffusers `rescale_noise_cfg`.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _batch_cond(cond: Mapping[str, Any], null_cond: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Concatenate cond[k] with null_cond[k] (broadcast to cond[k]'s shape and dtype) along batch.

    Keys of cond that null_cond lacks are shared by both halves (e.g. fps or resolution)."""
    extra = sorted(set(null_cond) - set(cond))
    check(not extra, "null_cond", extra, "has keys the conditional call did not pass")
    batched = {}
    for key, value in cond.items():
        value = jnp.asarray(value)
        null = jnp.asarray(null_cond[key]) if key in null_cond else value
        null = jnp.broadcast_to(null, value.shape).astype(value.dtype)
        batched[key] = jnp.concatenate([value, null], axis=0)
    return batched


def cfg_denoiser(denoise_fn: Denoiser, cfg_scale: Any, *, null_cond: Mapping[str, Any],
                 guidance_rescale: float = 0.0, guide_channels: int | None = None) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance", eq. 6).

    Returns `guided(x_t, t, **cond)` that makes ONE denoiser call on a 2B batch —
    x_t and t concatenated with themselves, each cond[k] concatenated with null_cond[k] — splits
    the output into (cond_out, uncond_out) and returns, on the first `guide_channels` channels,

      (1 - s) * uncond_out + s * cond_out   ( = uncond + s (cond - uncond), exact at s = 0 and 1 )

    and cond_out on the remaining channels. This matches DiT's `forward_with_cfg`
    (facebookresearch/DiT models.py): the original DiT release guides the first 3 of the 4 latent
    channels (`guide_channels=3`, for exact reproduction of its FID) and takes the learned-sigma
    channels from the conditional half; guiding all C latent channels (`guide_channels=C`) is the
    standard choice. `guide_channels=None` guides every output channel. With guidance_rescale > 0
    the guided channels are then passed through `rescale_noise_cfg` against cond_out.

    Args:
      denoise_fn: `denoise_fn(x_t, t, **cond) -> model_output (B, ..., C_out)`.
      cfg_scale: s, a float or a (B,) array (traced values allowed); 1 = conditional only,
        0 = unconditional only. s > 1 strengthens the condition (DiT uses 4.0, SD 7.5).
      null_cond: dict of the unconditional inputs for the keys of cond that change, e.g.
        {"y": num_classes} (the null class id) or {"text": empty_emb, "text_mask": empty_mask};
        each value is broadcast to the shape of cond's value (a scalar id or a (1, L, D) embedding
        is fine). Keys absent from null_cond are passed unchanged to both halves.
      guidance_rescale: phi in [0, 1] (Lin et al. 2024 use 0.7); 0 disables it.
      guide_channels: number of leading output channels to guide, or None for all.

    Raises:
      UserError: non-finite cfg_scale, guidance_rescale outside [0, 1], guide_channels < 1 (here);
        null_cond keys absent from cond, or guide_channels larger than the output's channel count
        (when the returned function is first traced).
    """
    if _is_number(cfg_scale):
        check(math.isfinite(cfg_scale), "cfg_scale", cfg_scale, "must be a finite number")
    check(_is_number(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0, "guidance_rescale",
          guidance_rescale, "must be a number in [0, 1]")
    check(guide_channels is None or (isinstance(guide_channels, int) and guide_channels >= 1),
          "guide_channels", guide_channels, "must be None or an int >= 1")

    def guided(x_t: jax.Array, t: jax.Array, **cond: Any) -> jax.Array:
        t = jnp.asarray(t)
        t2 = t if t.ndim == 0 else jnp.concatenate([t, t], axis=0)
        out = denoise_fn(jnp.concatenate([x_t, x_t], axis=0), t2, **_batch_cond(cond, null_cond))
        cond_out, uncond_out = jnp.split(out, 2, axis=0)
        g = out.shape[-1] if guide_channels is None else guide_channels
        check(g <= out.shape[-1], "guide_channels", guide_channels,
              f"must be <= the denoiser's {out.shape[-1]} output channels")
        s = _per_example(cfg_scale, out.ndim).astype(out.dtype)
        mixed = (1 - s) * uncond_out[..., :g] + s * cond_out[..., :g]
        if guidance_rescale > 0:
            mixed = rescale_noise_cfg(mixed, cond_out[..., :g], guidance_rescale)
        return jnp.concatenate([mixed, cond_out[..., g:]], axis=-1)

    return guided


def classifier_guidance_denoiser(denoise_fn: Denoiser, log_prob_fn: Callable[..., jax.Array],
                                 scale: Any, *, schedule: schedules.Schedule) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs", Algorithm 2 /
    openai guided-diffusion `condition_score`).

    Returns `guided(x_t, t, **cond)`: with g = d/dx_t sum_b log p(y_b | x_t, t) (by `jax.grad`) it
    converts the denoiser output to (x0, eps) with `schedules.to_x0_eps`, shifts

      eps' = eps - sigma_t * scale * g        (sigma_t = sqrt(1 - alphas_cumprod[t]) for VP)

    (i.e. the score -eps/sigma_t gains scale * g), recomputes x0' = (x_t - sigma_t eps') / alpha_t
    and returns eps', x0', v' = alpha eps' - sigma x0', or the flow velocity eps' - x0' according to
    schedule.prediction_type. Output channels beyond x_t's C (a learned-variance half) are passed
    through unchanged. Used with DDIM this is exactly ADM's Algorithm 2; ADM's ancestral sampler
    (Algorithm 1) instead shifts the posterior mean by Sigma * scale * g, which differs from the eps
    shift by O(beta_t) per step.

    Args:
      denoise_fn: `denoise_fn(x_t, t, **cond)` predicting schedule.prediction_type.
      log_prob_fn: `log_prob_fn(x_t, t, **cond) -> (B,)` log p(y | x_t, t) of the wanted class,
        e.g. `lambda x, t, y: jax.nn.log_softmax(clf.apply(p, x, t))[jnp.arange(len(y)), y]`;
        it receives the same keyword inputs as denoise_fn. t: integer timesteps (B,) or scalar.
      scale: classifier scale s (ADM uses 1-10 on ImageNet), float or traced scalar / (B,) array.
      schedule: the `Schedule` whose integer timesteps t index alphas_cumprod.

    Raises:
      UserError: non-finite scale.
    """
    if _is_number(scale):
        check(math.isfinite(scale), "scale", scale, "must be a finite number")

    def guided(x_t: jax.Array, t: jax.Array, **cond: Any) -> jax.Array:
        out = denoise_fn(x_t, t, **cond)
        grad = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t, **cond)))(x_t)
        t_b = jnp.broadcast_to(jnp.asarray(t), x_t.shape[:1])
        alpha, sigma = (_per_example(a, x_t.ndim) for a in schedules.alpha_sigma(schedule, t_b))
        c = x_t.shape[-1]
        pred, rest = out[..., :c], out[..., c:]
        _, eps = schedules.to_x0_eps(pred, x_t, alpha, sigma, schedule.prediction_type)
        eps = eps - sigma * _per_example(scale, x_t.ndim) * grad
        x0 = schedules.x0_from_eps(x_t, eps, alpha, sigma)
        pred = {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": schedules.v_from_x0_eps(x0, eps, alpha, sigma),
            "flow": eps - x0,
        }[schedule.prediction_type]
        return jnp.concatenate([pred.astype(out.dtype), rest], axis=-1)

    return guided
