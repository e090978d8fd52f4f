"""Frame conditioning for video diffusion: image-to-video, extension, interpolation, any known frames.

A per-frame mask `frame_mask (B, T)` (1 = known / given, 0 = to generate) says which frames
condition the model. As in Open-Sora (v1.1 `MaskGenerator` + `t_mask`; the "frame conditioning"
of the Sora report's image-to-video / extension / interpolation):

- training: known frames stay clean and get timestep 0, unknown frames are noised at the
  example's t; the model sees a per-frame timestep `t (B, T)`; the loss covers unknown frames
  only (`frame_conditioned_diffusion_loss`, which is `losses.diffusion_loss` with a frame mask);
  `random_frame_mask` draws the masks (a mixture of no conditioning, first frame, first k
  frames, first + last, random frames).
- sampling: `frame_conditioned_sampling` gives `samplers.sample` its arguments: `known=(x_known,
  mask)` (RePaint-style replacement after every step, Lugmayr et al. 2022, as the samplers
  implement: the result equals the given frames exactly) and a denoiser wrapper that, before
  each model call, puts the clean known frames into the input and gives them t = 0 — so the
  model sees exactly what it saw in training. (Its "t = 0" is the clean end of the model's time
  axis: VP timestep index 0, flow time 0; not for the "consistency" sampler, whose denoiser
  input is rescaled.)

Nothing here imports a model; the denoiser is `denoise_fn(x_t (B, T, H, W, C), t (B, T), **cond)`,
e.g. `genjax.models.video_dit.VideoDiT`, whose regular form takes per-frame timesteps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from genjax.diffusion import losses, schedules
from genjax.errors import check

MASK_KINDS = ("none", "first", "first_k", "first_last", "random")
# Close to Open-Sora v1.1's mask_ratios (identity 0.75; image / quarter head, tail, head+tail, random).
DEFAULT_PROBS = {"none": 0.75, "first": 0.05, "first_k": 0.1, "first_last": 0.05, "random": 0.05}


def _check_sizes(batch, num_frames):
    check(isinstance(batch, int) and batch >= 1, "batch", batch, "must be an int >= 1")
    check(isinstance(num_frames, int) and num_frames >= 1, "num_frames", num_frames, "must be an int >= 1")


def image_to_video_mask(batch: int, num_frames: int) -> jax.Array:
    """`(batch, num_frames)` float32 mask with the first frame known (image-to-video)."""
    return extension_mask(batch, num_frames, 1)


def extension_mask(batch: int, num_frames: int, k: int) -> jax.Array:
    """`(batch, num_frames)` float32 mask with the first `k` frames known (video extension).

    Raises:
      UserError: batch / num_frames < 1, k outside [1, num_frames].
    """
    _check_sizes(batch, num_frames)
    check(isinstance(k, int) and 1 <= k <= num_frames, "k", k, f"must be an int in [1, num_frames={num_frames}]")
    return jnp.broadcast_to(jnp.arange(num_frames) < k, (batch, num_frames)).astype(jnp.float32)


def interpolation_mask(batch: int, num_frames: int) -> jax.Array:
    """`(batch, num_frames)` float32 mask with the first and last frames known (interpolation).

    Raises:
      UserError: batch < 1 or num_frames < 2.
    """
    _check_sizes(batch, num_frames)
    check(num_frames >= 2, "num_frames", num_frames, "must be >= 2 to interpolate between first and last")
    idx = jnp.arange(num_frames)
    return jnp.broadcast_to((idx == 0) | (idx == num_frames - 1), (batch, num_frames)).astype(jnp.float32)


def random_frame_mask(rng: jax.Array, batch: int, num_frames: int, *,
                      probs: Mapping[str, float] | None = None, max_known_ratio: float = 0.25) -> jax.Array:
    """Draw training frame masks: each example picks a kind with probability `probs[kind]`.

    Kinds (1 = known): "none" all 0; "first" frame 0 (image-to-video); "first_k" the first k
    frames (extension); "first_last" frames 0 and T-1 (interpolation; frame 0 only if T = 1);
    "random" k frames at uniformly random positions. k ~ Uniform{1, ..., K}, K = max(1,
    floor(max_known_ratio * T)) (Open-Sora's "quarter" masks: K = T / 4).

    Args:
      rng: PRNG key. batch, num_frames: static ints >= 1.
      probs: kind -> probability (missing kinds 0; must sum to 1). Default `DEFAULT_PROBS`.
      max_known_ratio: in (0, 1].

    Returns:
      `(batch, num_frames)` float32 in {0, 1}. Jittable (batch, num_frames, probs static).

    Raises:
      UserError: unknown kind, negative probabilities or a sum != 1, sizes < 1, ratio out of range.

    Source: Open-Sora v1.1 `opensora/models/stdit/stdit2.py` / `MaskGenerator` (mask_ratios).
    """
    _check_sizes(batch, num_frames)
    probs = dict(DEFAULT_PROBS if probs is None else probs)
    unknown = sorted(set(probs) - set(MASK_KINDS))
    check(not unknown, "probs", unknown, f"kinds must be among {MASK_KINDS}")
    check(all(p >= 0 for p in probs.values()) and abs(sum(probs.values()) - 1.0) < 1e-6, "probs", probs,
          "must be >= 0 and sum to 1")
    check(0.0 < max_known_ratio <= 1.0, "max_known_ratio", max_known_ratio, "must be in (0, 1]")
    k_kind, k_count, k_perm = jax.random.split(rng, 3)
    p = jnp.asarray([probs.get(kind, 0.0) for kind in MASK_KINDS], jnp.float32)
    kind = jax.random.choice(k_kind, len(MASK_KINDS), (batch,), p=p)
    k_max = max(1, int(max_known_ratio * num_frames))
    k = jax.random.randint(k_count, (batch, 1), 1, k_max + 1)
    idx = jnp.arange(num_frames)[None]
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_perm, (batch, num_frames)), axis=1), axis=1)
    masks = jnp.stack([
        jnp.zeros((batch, num_frames), bool),
        jnp.broadcast_to(idx == 0, (batch, num_frames)),
        idx < k,
        jnp.broadcast_to((idx == 0) | (idx == num_frames - 1), (batch, num_frames)),
        rank < k,
    ])  # (kinds, B, T)
    return jnp.take_along_axis(masks, kind[None, :, None], axis=0)[0].astype(jnp.float32)


def frame_timesteps(t: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """Per-frame timesteps: `t (B,)` and `frame_mask (B, T)` -> `(B, T)`, 0 on known frames, t elsewhere."""
    t = jnp.asarray(t)
    return jnp.where(jnp.asarray(frame_mask) != 0, jnp.zeros((), t.dtype), t[:, None])


def _check_video_mask(x: jax.Array, frame_mask, field: str) -> jax.Array:
    check(jnp.ndim(x) == 5, f"{field}.shape", tuple(jnp.shape(x)), "must be (B, T, H, W, C)")
    check(tuple(jnp.shape(frame_mask)) == tuple(x.shape[:2]), "frame_mask.shape", tuple(jnp.shape(frame_mask)),
          f"must be (B, T)={tuple(x.shape[:2])}")
    return (jnp.asarray(frame_mask) != 0)[:, :, None, None, None]


def frame_conditioned_diffusion_loss(denoise_fn: Callable[..., jax.Array], x0: jax.Array, rng: jax.Array, *,
                                     schedule: schedules.Schedule, frame_mask: jax.Array,
                                     cond: Mapping[str, Any] | None = None, **loss_kw) -> tuple[jax.Array, dict]:
    """`losses.diffusion_loss` with known frames kept clean at t = 0 and left out of the loss.

    The denoiser is called as `denoise_fn(x_in, t_frames, **cond)` with `x_in` = x_t where the frame
    is unknown and x0 where it is known, and `t_frames (B, T)` = `frame_timesteps(t, frame_mask)`.
    The loss is diffusion_loss's masked mean over unknown frames (`mask = 1 - frame_mask`), so
    the model output on known frames gets exactly zero gradient; an example with every frame
    known contributes nothing. Randomness, targets and metrics are diffusion_loss's.

    Args:
      denoise_fn: `(x (B, T, H, W, C), t (B, T), **cond) -> (B, T, H, W, C or 2C)`.
      x0: `(B, T, H, W, C)` clean latents. rng: PRNG key. schedule: a VP `Schedule`.
      frame_mask: `(B, T)` 0/1 (1 = known), e.g. from `random_frame_mask`.
      cond: model keyword inputs. **loss_kw: diffusion_loss options (weighting, learn_sigma, ...).

    Returns:
      (loss, metrics) as `losses.diffusion_loss`.

    Raises:
      UserError: x0 not 5-D, frame_mask not (B, T), or diffusion_loss's errors.

    Source: Open-Sora v1.1 (`x_mask` / `t0` in `IDDPM.training_losses`): known frames replaced by
      x0 with timestep 0, loss masked to the generated frames.
    """
    known = _check_video_mask(x0, frame_mask, "x0")
    check("mask" not in loss_kw, "mask", "given", "is set from frame_mask")

    def conditioned(x_t, t, **c):
        return denoise_fn(jnp.where(known, x0, x_t), frame_timesteps(t, frame_mask), **c)

    return losses.diffusion_loss(conditioned, x0, rng, schedule=schedule, cond=cond,
                                 mask=(~known).astype(x0.dtype), **loss_kw)


@dataclasses.dataclass(frozen=True)
class FrameConditionedDenoiser:
    """Wraps `denoise_fn(x, t (B, T), **cond)` for the samplers' `denoise_fn(x_t, t (B,), **cond)`.

    Called with `cond` holding `frame_mask (B, T)` and `x_known (B, T, H, W, C)` (passed through
    `samplers.sample(cond=...)`, so one compiled loop serves any mask): known frames of the input
    are replaced by the clean `x_known` and get t = 0, as in training. Hashable (frozen dataclass
    of a function), as `samplers.sample` needs.
    """

    denoise_fn: Callable[..., jax.Array]

    def __call__(self, x_t: jax.Array, t: jax.Array, *, frame_mask: jax.Array, x_known: jax.Array, **cond):
        known = (frame_mask != 0)[:, :, None, None, None]
        return self.denoise_fn(jnp.where(known, x_known.astype(x_t.dtype), x_t), frame_timesteps(t, frame_mask),
                               **cond)


def frame_conditioned_sampling(denoise_fn: Callable[..., jax.Array], x_known: jax.Array, frame_mask: jax.Array,
                               cond: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Arguments for `samplers.sample(noise=..., schedule=..., rng=..., **these)`.

    Returns `{"denoise_fn": FrameConditionedDenoiser(denoise_fn), "known": (x_known, mask (B, T, 1, 1, 1)),
    "cond": {**cond, "frame_mask": ..., "x_known": ...}}`. The sample then equals `x_known`
    exactly on known frames (the samplers' RePaint replacement ends with the clean values), and
    the model is called as in `frame_conditioned_diffusion_loss`. Values of `x_known` on unknown
    frames are ignored. An rng is required (the samplers noise the known region).

    Raises:
      UserError: x_known not 5-D or frame_mask not (B, T).
    """
    known = _check_video_mask(x_known, frame_mask, "x_known")
    mask = known.astype(x_known.dtype)
    x_known = jnp.where(known, x_known, 0)
    return {"denoise_fn": FrameConditionedDenoiser(denoise_fn), "known": (x_known, mask),
            "cond": {**dict(cond or {}), "frame_mask": jnp.asarray(frame_mask, jnp.float32), "x_known": x_known}}
