"""Distillation objectives: consistency distillation (Song et al. 2023, "Consistency models").

Same conventions as `genjax.diffusion.losses` (a denoiser closing over its parameters, clean data
`x0 (B, ...)`, one PRNG key, `(loss, metrics)` float32; an optional `mask` broadcastable to x0).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from genjax.diffusion import schedules
from genjax.diffusion.losses import Denoiser, _bcast, _check_mask, _masked_mean
from genjax.errors import check

DISTANCES = ("l2", "pseudo_huber")



def consistency_function(denoise_fn: Denoiser, x_t: jax.Array, t: jax.Array, *,
                         schedule: schedules.Schedule, cond: Mapping[str, Any] | None = None,
                         sigma_data: float = 0.5) -> jax.Array:
    """Consistency-model output f(x_t, t), an estimate of x0 (Song et al. 2023, "Consistency
    models", eq. 5 and Appendix C), for a denoiser of a discrete VP schedule.

    Time / sigma mapping: x_t = alpha_t x0 + sigma_t eps is the EDM / VE variable
    x~ = x_t / alpha_t = x0 + sigma~ eps at noise level sigma~_t = sigma_t / alpha_t, and
    sigma_min = sigma~_0 (timestep 0 is the boundary). With the x0 prediction D of the denoiser
    (via `schedules.to_x0_eps`) the network output F is the one EDM's preconditioning
    (Karras et al. 2022, Table 1) maps to D, and the boundary parameterisation is applied to it:

      F = (D - c_skip(sigma~; 0) x~) / c_out(sigma~; 0)
      f = c_skip(sigma~; sigma_min) x~ + c_out(sigma~; sigma_min) F

    with (c_skip, c_out)(sigma; sigma_min) = `schedules.consistency_scalings`. So f = x~ exactly at
    t = 0 (where sigma~ is set to sigma_min bit for bit), f -> D as sigma~ grows, and a student
    initialised from the teacher starts near the teacher's denoiser, as in Song et al.'s CD.

    x_t: (B, ...) float; t: (B,) int in [0, T). Needs alphas_cumprod[t] > 0 (not the last step of
    a zero-terminal-SNR schedule). Returns x_t's shape, float32.
    """
    cond = {} if cond is None else cond
    alpha, sigma = (_bcast(a, x_t.ndim) for a in schedules.alpha_sigma(schedule, t))
    x0, _ = schedules.to_x0_eps(denoise_fn(x_t, t, **cond).astype(jnp.float32), x_t, alpha, sigma,
                                schedule.prediction_type)
    sigma_min = _ve_sigma(schedule, jnp.zeros((), jnp.int32))
    # Select sigma_min itself at t = 0, so that sigma - sigma_min is exactly 0 however XLA fuses.
    sigma_ve = jnp.where(_bcast(jnp.asarray(t) == 0, x_t.ndim), sigma_min, sigma / alpha)
    x_ve = x_t / alpha
    c_skip_edm, c_out_edm = schedules.consistency_scalings(sigma_ve, sigma_data, 0.0)
    c_skip, c_out = schedules.consistency_scalings(sigma_ve, sigma_data, sigma_min)
    return c_skip * x_ve + c_out * ((x0 - c_skip_edm * x_ve) / c_out_edm)


def _ve_sigma(schedule: schedules.Schedule, t: jax.Array) -> jax.Array:
    alpha, sigma = schedules.alpha_sigma(schedule, t)
    return sigma / alpha


def consistency_timesteps(num_timesteps: int, num_steps: int, n: jax.Array):
    """Adjacent discretisation points (t_{n+1}, t_n) for interval n in [0, num_steps): with
    k = T // N, t_{n+1} = (n + 1) k - 1 and t_n = max(t_{n+1} - k, 0), i.e. the DDIM timesteps
    k-1, 2k-1, ..., and the boundary 0 (diffusers' train_lcm_distill_sd `DDIMSolver` grid)."""
    k = num_timesteps // num_steps
    hi = (n + 1) * k - 1
    return hi, jnp.maximum(hi - k, 0)


def consistency_distillation_loss(student_fn: Denoiser, target_fn: Denoiser, teacher_fn: Denoiser,
                                  x0: jax.Array, rng: jax.Array, *, schedule: schedules.Schedule,
                                  num_steps: int, cond: Mapping[str, Any] | None = None,
                                  sigma_data: float = 0.5, distance: str = "l2",
                                  huber_c: float | None = None,
                                  mask: Any = None) -> tuple[jax.Array, dict]:
    """Consistency distillation (Song et al. 2023, Algorithm 2, lambda(t_n) = 1).

    n ~ Uniform{0..N-1} (from t_rng), (t_{n+1}, t_n) = `consistency_timesteps`, x_{t_{n+1}} =
    q_sample(x0, t_{n+1}, noise); one DDIM (eta = 0) step of the teacher to t_n, which is exactly an
    Euler step of the probability-flow ODE in the VE variable x / alpha:
    x^_{t_n} = alpha_n x0^ + sigma_n eps^ with (x0^, eps^) the teacher's predictions at t_{n+1};
    then loss = d(f_student(x_{t_{n+1}}, t_{n+1}), stopgrad f_target(x^_{t_n}, t_n)) with f =
    `consistency_function`. Pass a guided teacher (e.g. `guidance.cfg_denoiser`) for guided CD.

    Distances, per example, then averaged (masked as in the module docstring): "l2" the mean
    squared error over non-batch dims; "pseudo_huber" sqrt(|a - b|^2 + c^2) - c over the whole
    example (Song & Dhariwal 2024, "Improved techniques for training consistency models", Sec. 3.3),
    c = huber_c or 0.00054 sqrt(d), d the number of counted elements per example.

    Args:
      student_fn: the network being trained; target_fn: its EMA (or the same function);
        teacher_fn: the pretrained diffusion model. All `fn(x_t, t, **cond)` predicting
        schedule.prediction_type, t (B,) int32.
      x0: (B, ...) float clean data; rng: PRNG key split as in the module docstring.
      schedule: a VP `Schedule` with alphas_cumprod > 0 at every grid point.
      num_steps: N, 1 <= N <= T.

    Returns:
      (loss, {"loss"}), float32 scalars.

    Raises:
      UserError: flow schedule, num_steps outside [1, T], unknown distance, huber_c <= 0, or a mask
        that does not broadcast to x0.
    """
    num_timesteps = schedule.num_timesteps
    check(not schedule.is_flow, "schedule.prediction_type", schedule.prediction_type,
          "consistency distillation needs a VP schedule (alpha_t > 0)")
    check(isinstance(num_steps, int) and 1 <= num_steps <= num_timesteps, "num_steps", num_steps,
          f"must be an int in [1, {num_timesteps}]")
    check(distance in DISTANCES, "distance", distance, f"must be one of {DISTANCES}")
    check(huber_c is None or huber_c > 0, "huber_c", huber_c, "must be None or > 0")
    _check_mask(mask, x0)
    cond = {} if cond is None else cond

    t_rng, noise_rng = jax.random.split(rng)
    n = jax.random.randint(t_rng, (x0.shape[0],), 0, num_steps)
    t_hi, t_lo = consistency_timesteps(num_timesteps, num_steps, n)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_hi = schedules.q_sample(schedule, x0, t_hi, noise)

    a_hi, s_hi = (_bcast(a, x0.ndim) for a in schedules.alpha_sigma(schedule, t_hi))
    a_lo, s_lo = (_bcast(a, x0.ndim) for a in schedules.alpha_sigma(schedule, t_lo))
    teacher_out = jax.lax.stop_gradient(teacher_fn(x_hi, t_hi, **cond))
    x0_hat, eps_hat = schedules.to_x0_eps(teacher_out, x_hi, a_hi, s_hi, schedule.prediction_type)
    x_lo = a_lo * x0_hat + s_lo * eps_hat

    f = dict(schedule=schedule, cond=cond, sigma_data=sigma_data)
    pred = consistency_function(student_fn, x_hi, t_hi, **f)
    target = jax.lax.stop_gradient(consistency_function(target_fn, x_lo, t_lo, **f))
    sq_err = (pred - target) ** 2
    if distance == "l2":
        loss = _masked_mean(sq_err, mask)
    else:
        keep = jnp.ones(x0.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask) != 0,
                                                                             x0.shape)
        axes = tuple(range(1, x0.ndim))
        sq_norm = jnp.sum(jnp.where(keep, sq_err, 0.0), axis=axes)
        count = jnp.sum(keep, axis=axes)
        c = 0.00054 * jnp.sqrt(jnp.maximum(count, 1)) if huber_c is None else huber_c
        loss = jnp.mean(jnp.sqrt(sq_norm + c**2) - c)
    return loss, {"loss": loss}
