"""Noise schedules: betas, alphas_cumprod, alpha/sigma/logSNR views, q_sample, respacing.

Conventions (Ho et al. 2020, "DDPM"; Kingma et al. 2021, "VDM"):
  x_t = alpha_t * x0 + sigma_t * eps,  alpha_t = sqrt(alphas_cumprod[t]),
  sigma_t = sqrt(1 - alphas_cumprod[t]),  logsnr_t = log(alpha_t^2 / sigma_t^2).
Discrete timesteps are int32 indices in [0, T); index 0 is the least noisy step.

Rectified flow / flow matching (Liu et al. 2023; Esser et al. 2024, "SD3"):
  x_s = (1 - s) * x0 + s * noise,  s in [0, 1],  velocity target u = noise - x0,
and the denoiser is called with `t = s * 1000` (as diffusers' FlowMatchEulerDiscreteScheduler).
A "flow" `Schedule` stores the variance-preserving `alphas_cumprod` with the same logSNR, so the
flow coefficients are alpha / (alpha + sigma) and sigma / (alpha + sigma) of the VP ones.

Everything is float32 `jnp` unless stated; schedule construction uses float64 numpy.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from genjax.errors import check, fail

NAMES = ("linear", "scaled_linear", "cosine", "sigmoid", "flow")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
FLOW_TIME_SCALE = 1000.0  # the denoiser sees t = s * 1000 for flow schedules (SD3 convention)


@struct.dataclass
class Schedule:
    """A discrete diffusion schedule (a pytree: arrays are leaves, strings are static).

    Fields:
      betas: (T,) float32 in (0, 1], per-step noise variances.
      alphas_cumprod: (T,) float32 in [0, 1), cumulative products of (1 - betas); decreasing.
      prediction_type: "epsilon" | "sample" | "v_prediction" | "flow" (what the denoiser outputs).
      name: the schedule name given to `make` ("linear", ..., with ":respaced" after `respace`).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    name: str = struct.field(pytree_node=False, default="linear")

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete timesteps."""
        return int(self.betas.shape[0])

    @property
    def is_flow(self) -> bool:
        """True for rectified-flow schedules (x_s = (1 - s) x0 + s noise)."""
        return self.prediction_type == "flow"


def _betas_for_alpha_bar(alpha_bar, num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1] (Nichol & Dhariwal 2021, eq. 17 and the
    beta clip below it; diffusers `betas_for_alpha_bar`)."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = alpha_bar(t)
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _cosine_alpha_bar(t):
    """Improved DDPM eq. 17 without the f(0) normaliser: cos^2((t + s) / (1 + s) * pi / 2), s = 0.008."""
    return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _sigmoid_alpha_bar(t, start: float, end: float, tau: float):
    """Chen 2023, "On the importance of noise scheduling", Algorithm 1 (sigmoid_schedule), clip_min 1e-9."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    out = (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(out, 1e-9, 1.0)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Algorithm 1."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def _from_betas(betas: np.ndarray, prediction_type: str, name: str) -> Schedule:
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32),
                    prediction_type=prediction_type, name=name)


def make(name: str, num_timesteps: int = 1000, *, beta_start: float | None = None,
         beta_end: float | None = None, prediction_type: str | None = None,
         rescale_zero_terminal_snr: bool = False, sigmoid_start: float = -3.0,
         sigmoid_end: float = 3.0, sigmoid_tau: float = 1.0) -> Schedule:
    """Build a discrete schedule of `num_timesteps` steps.

    Names (betas computed in float64, stored float32):
      "linear": DDPM (Ho et al. 2020 Sec. 4), betas = linspace(beta_start=1e-4, beta_end=0.02).
      "scaled_linear": LDM / Stable Diffusion, betas = linspace(sqrt(0.00085), sqrt(0.012))^2.
      "cosine": improved DDPM (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999; equal to
        diffusers' "squaredcos_cap_v2".
      "sigmoid": Chen 2023 Algorithm 1 with (sigmoid_start, sigmoid_end, sigmoid_tau), discretised
        like "cosine". (diffusers' "sigmoid" is GeoDiff's, a different schedule.)
      "flow": rectified flow, s_i = (i + 1) / T, stored as the VP alphas_cumprod with the same
        logSNR: (1 - s)^2 / ((1 - s)^2 + s^2). Its prediction_type is "flow".
    linear / scaled_linear / cosine match diffusers' DDPMScheduler(beta_schedule=...) to float32
    rounding (checked in tests/diffusion/test_schedules.py).

    Args:
      prediction_type: what the denoiser predicts; default "flow" for name "flow", else "epsilon".
      rescale_zero_terminal_snr: Lin et al. 2024 Alg. 1 (alphas_cumprod[-1] becomes exactly 0);
        equals diffusers' `rescale_betas_zero_snr`.

    Raises:
      UserError: unknown name, num_timesteps < 1, unknown prediction_type, or a "flow" name and
        prediction_type that do not go together.
    """
    check(name in NAMES, "schedule", name, f"must be one of {NAMES}")
    check(isinstance(num_timesteps, int) and num_timesteps >= 1, "num_timesteps", num_timesteps,
          "must be an int >= 1")
    if prediction_type is None:
        prediction_type = "flow" if name == "flow" else "epsilon"
    check(prediction_type in PREDICTION_TYPES, "prediction_type", prediction_type,
          f"must be one of {PREDICTION_TYPES}")
    check((name == "flow") == (prediction_type == "flow"), "prediction_type", prediction_type,
          "must be 'flow' exactly when the schedule is 'flow'")
    n = num_timesteps
    if name == "linear":
        betas = np.linspace(1e-4 if beta_start is None else beta_start,
                            0.02 if beta_end is None else beta_end, n, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace((0.00085 if beta_start is None else beta_start) ** 0.5,
                            (0.012 if beta_end is None else beta_end) ** 0.5, n, dtype=np.float64) ** 2
    elif name == "cosine":
        betas = _betas_for_alpha_bar(_cosine_alpha_bar, n)
    elif name == "sigmoid":
        betas = _betas_for_alpha_bar(
            lambda t: _sigmoid_alpha_bar(t, sigmoid_start, sigmoid_end, sigmoid_tau), n)
    else:  # flow
        s = np.arange(1, n + 1, dtype=np.float64) / n
        ac = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
        betas = 1.0 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    if rescale_zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return _from_betas(betas, prediction_type, name)


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims, to broadcast over trailing dims of x."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _log_alphas_cumprod(schedule: Schedule) -> jax.Array:
    """(T,) log alphas_cumprod as a float32 cumsum of log1p(-betas): keeps 1 - alphas_cumprod
    accurate where alphas_cumprod ~ 1, which a float32 alphas_cumprod cannot."""
    return jnp.cumsum(jnp.log1p(-schedule.betas))


def check_timesteps(schedule: Schedule, t: Any) -> None:
    """UserError unless concrete timesteps `t` are integers in [0, num_timesteps) (an index out of
    range would be clamped silently, a float one truncated); traced `t` (inside jit) is not
    checked."""
    if isinstance(t, jax.core.Tracer):
        return
    a = np.asarray(t)
    n = schedule.num_timesteps
    if not np.issubdtype(a.dtype, np.integer):
        check(np.issubdtype(a.dtype, np.floating) and bool(np.all(a == np.round(a))), "t.dtype",
              str(a.dtype), "timesteps must be integers (floats would be truncated)")
    bad = a[(a < 0) | (a >= n)]
    check(bad.size == 0, "t", bad.flat[0].item() if bad.size else None,
          f"timesteps must be in [0, num_timesteps={n})")


def alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Signal and noise scales at integer timesteps `t` (any int shape, e.g. (B,)), float32.

    VP schedules: alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]), the float32
    arithmetic of diffusers' schedulers (so samplers match them step by step).
    Flow schedules: alpha = 1 - s, sigma = s (s = (t + 1) / T for `make("flow")`), the VP pair with
    the same logSNR rescaled to alpha + sigma = 1, computed from log alphas_cumprod so small s
    stays accurate.

    Raises:
      UserError: concrete `t` outside [0, num_timesteps) or not integer-valued (`check_timesteps`).
    """
    check_timesteps(schedule, t)
    t = jnp.asarray(t, jnp.int32)
    if schedule.is_flow:
        log_ac = _log_alphas_cumprod(schedule)[t]
        alpha, sigma = jnp.exp(0.5 * log_ac), jnp.sqrt(-jnp.expm1(log_ac))
        return alpha / (alpha + sigma), sigma / (alpha + sigma)
    ac = schedule.alphas_cumprod[t]
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def logsnr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """log(alpha_t^2 / sigma_t^2) at integer timesteps `t`, float32 (-inf where alphas_cumprod = 0).
    Computed from log alphas_cumprod, accurate also where alphas_cumprod ~ 1.

    Raises:
      UserError: concrete `t` outside [0, num_timesteps) or not integer-valued (`check_timesteps`).
    """
    check_timesteps(schedule, t)
    log_ac = _log_alphas_cumprod(schedule)[jnp.asarray(t, jnp.int32)]
    return log_ac - jnp.log(-jnp.expm1(log_ac))


def continuous_alpha_sigma(name: str, t: jax.Array, *, sigmoid_start: float = -3.0,
                           sigmoid_end: float = 3.0, sigmoid_tau: float = 1.0,
                           ) -> tuple[jax.Array, jax.Array]:
    """Continuous-time (alpha_t, sigma_t) for t in [0, 1] float (any shape), float32.

      "linear": the VP-SDE limit of DDPM's linear schedule (Song et al. 2021, eq. 33), beta(t) =
        0.1 + t * (20 - 0.1), alphas_cumprod(t) = exp(-integral_0^t beta).
      "scaled_linear": the same with beta(t) = 1000 * (sqrt(0.00085) + t (sqrt(0.012) - sqrt(0.00085)))^2.
      "cosine": improved DDPM eq. 17, alphas_cumprod(t) = f(t) / f(0).
      "sigmoid": Chen 2023 Algorithm 1.
      "flow": alpha = 1 - t, sigma = t.
    VP names return sigma = sqrt(1 - alpha^2).

    Raises:
      UserError: unknown name.
    """
    check(name in NAMES, "schedule", name, f"must be one of {NAMES}")
    t = jnp.asarray(t, jnp.float32)
    if name == "flow":
        return 1.0 - t, t
    if name == "linear":
        b0, b1 = 0.1, 20.0
        log_ac = -(b0 * t + 0.5 * (b1 - b0) * t**2)
    elif name == "scaled_linear":
        c0, c1 = 0.00085**0.5, 0.012**0.5
        log_ac = -1000.0 * ((c0 + t * (c1 - c0)) ** 3 - c0**3) / (3 * (c1 - c0))
    elif name == "cosine":
        f = lambda u: jnp.cos((u + 0.008) / 1.008 * jnp.pi / 2)  # noqa: E731
        log_ac = 2 * (jnp.log(jnp.clip(f(t), 0.0, None)) - jnp.log(f(0.0)))
    else:
        log_ac = jnp.log(_sigmoid_alpha_bar_jnp(t, sigmoid_start, sigmoid_end, sigmoid_tau))
    alpha = jnp.exp(0.5 * log_ac)
    return alpha, jnp.sqrt(-jnp.expm1(log_ac))


def _sigmoid_alpha_bar_jnp(t, start, end, tau):
    v_start, v_end = jax.nn.sigmoid(start / tau), jax.nn.sigmoid(end / tau)
    out = (v_end - jax.nn.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return jnp.clip(out, 1e-9, 1.0)


def continuous_logsnr(name: str, t: jax.Array, **kw) -> jax.Array:
    """log(alpha_t^2 / sigma_t^2) of `continuous_alpha_sigma(name, t, **kw)`, float32."""
    alpha, sigma = continuous_alpha_sigma(name, t, **kw)
    return 2.0 * (jnp.log(alpha) - jnp.log(sigma))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process x_t = alpha_t x0 + sigma_t noise (DDPM eq. 4; flow: (1 - s) x0 + s noise).

    x0, noise: (B, ...) of any rank (images (B, H, W, C), videos (B, T, H, W, C)); t: (B,) int.
    Returns x_t with x0's shape, in the dtype of alpha * x0.
    """
    alpha, sigma = alpha_sigma(schedule, t)
    return _bcast(alpha, x0.ndim) * x0 + _bcast(sigma, x0.ndim) * noise


def flow_interpolate(x0: jax.Array, noise: jax.Array, s: jax.Array) -> jax.Array:
    """Rectified-flow path x_s = (1 - s) x0 + s noise; s: (B,) float in [0, 1] (or a scalar)."""
    s = _bcast(s, x0.ndim)
    return (1.0 - s) * x0 + s * noise


def shift_flow_time(s: Any, shift: Any) -> Any:
    """The SD3 timestep shift (Esser et al. 2024, eq. 23): s -> k s / (1 + (k - 1) s), k = `shift`
    > 0 (1 = identity; k > 1 spends more time at high noise). Maps [0, 1] onto [0, 1] monotonically;
    s and shift broadcast (a per-example k gives each example of a packed batch its own shift).
    Works on NumPy and JAX values alike."""
    return shift * s / (1 + (shift - 1) * s)


def flow_shift_for(num_tokens: Any, *, flow_shift: float = 1.0, shift_base_tokens: int = 0) -> Any:
    """The timestep shift of an example of `num_tokens` spacetime tokens (a number or a (B,) array):
    `flow_shift * sqrt(num_tokens / shift_base_tokens)`, or `flow_shift` when shift_base_tokens
    is 0. Larger and longer examples get a larger shift, since more tokens average away more
    noise (SD3, Esser et al. 2024, Sec. 5.3.2, eq. 23 with sqrt(m / n) per resolution; Open-Sora
    1.2 `timestep_transform`, which multiplies sqrt(pixels / base) and sqrt(frames / base) -
    the same as sqrt(tokens / base) for a spacetime grid).

    Raises:
      UserError: flow_shift <= 0 or not finite, shift_base_tokens < 0.
    """
    check(isinstance(flow_shift, (int, float)) and math.isfinite(flow_shift) and flow_shift > 0,
          "flow_shift", flow_shift, "must be a finite number > 0 (1 = no shift)")
    check(isinstance(shift_base_tokens, int) and shift_base_tokens >= 0, "shift_base_tokens",
          shift_base_tokens, "must be an int >= 0 (0 = the same shift at every size)")
    if not shift_base_tokens:
        return flow_shift
    return flow_shift * (num_tokens / shift_base_tokens) ** 0.5


# Parameterisation conversions (alpha, sigma broadcastable to x). VP identities: x_t = a x0 + s eps,
# v = a eps - s x0 (Salimans & Ho 2022, "Progressive distillation", Sec. 4 and Appendix D).

def eps_from_x0(x_t, x0, alpha, sigma):
    """eps = (x_t - alpha x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def x0_from_eps(x_t, eps, alpha, sigma):
    """x0 = (x_t - sigma eps) / alpha (DDPM eq. 15)."""
    return (x_t - sigma * eps) / alpha


def v_from_x0_eps(x0, eps, alpha, sigma):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
    """x0 = alpha x_t - sigma v (valid for alpha^2 + sigma^2 = 1)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
    """eps = sigma x_t + alpha v (valid for alpha^2 + sigma^2 = 1)."""
    return sigma * x_t + alpha * v


def to_x0_eps(model_output, x_t, alpha, sigma, prediction_type: str):
    """Convert a denoiser output to (x0, eps) predictions.

    prediction_type: "epsilon" | "sample" | "v_prediction" (VP: alpha^2 + sigma^2 = 1) or "flow"
    (velocity u = noise - x0 on x_t = alpha x0 + sigma noise with alpha + sigma = 1, so
    x0 = x_t - sigma u and eps = x_t + alpha u). Same formulas as diffusers' DDIMScheduler.step.

    Raises:
      UserError: unknown prediction_type.
    """
    check(prediction_type in PREDICTION_TYPES, "prediction_type", prediction_type,
          f"must be one of {PREDICTION_TYPES}")
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha, sigma), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, alpha, sigma)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, model_output, alpha, sigma), eps_from_v(x_t, model_output, alpha, sigma)
    return x_t - sigma * model_output, x_t + alpha * model_output


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Sorted original timesteps kept by respacing (openai improved-diffusion `space_timesteps`,
    used by ADM and DiT).

    section_counts: an int or "N" (N evenly spaced steps), "a,b,c" (split [0, T) into equal
    sections and take a, b, c evenly spaced steps from each), or "ddimN" (a stride s with exactly
    N steps in range(0, T, s), as DDIM).

    Raises:
      UserError: unparsable string, a section asking for more steps than it has, or no DDIM stride.
    """
    field = "section_counts"
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = section_counts[4:]
        check(desired.isdigit(), field, section_counts, "must be 'ddimN' with an integer N")
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == int(desired):
                return list(range(0, num_timesteps, stride))
        fail(field, section_counts, f"no integer stride gives exactly {desired} of {num_timesteps} steps")
    if isinstance(section_counts, int):
        counts = [section_counts]
    else:
        parts = str(section_counts).split(",")
        check(all(p.strip().isdigit() for p in parts), field, section_counts,
              "must be an int, 'N', 'a,b,c' or 'ddimN'")
        counts = [int(p) for p in parts]
    check(all(c >= 1 for c in counts), field, section_counts, "every count must be >= 1")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        check(size >= count, field, section_counts,
              f"section {i} has {size} timesteps, fewer than the {count} asked for")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]
        start += size
    return sorted(set(steps))


def respace(schedule: Schedule, section_counts: str | int) -> tuple[jax.Array, Schedule]:
    """Keep a subset of timesteps (improved DDPM Sec. 4 / openai `SpacedDiffusion`).

    Returns:
      timesteps: (S,) int32 original indices kept (sorted ascending); call the denoiser with these.
      schedule: S-step `Schedule` with alphas_cumprod = original alphas_cumprod[timesteps] and
        betas recomputed as 1 - alphas_cumprod[i] / alphas_cumprod[i - 1] (alphas_cumprod[-1] := 1).

    Raises:
      UserError: as `space_timesteps`.
    """
    kept = space_timesteps(schedule.num_timesteps, section_counts)
    ac = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
    betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
    new = Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(ac, jnp.float32),
                   prediction_type=schedule.prediction_type, name=schedule.name + ":respaced")
    return jnp.asarray(kept, jnp.int32), new


def consistency_scalings(sigma: jax.Array, sigma_data: float = 0.5, sigma_min: float = 0.002,
                         ) -> tuple[jax.Array, jax.Array]:
    """Consistency-model boundary-condition scalings (Song et al. 2023, Appendix C):

      c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
      c_out = sigma_data (sigma - sigma_min) / sqrt(sigma^2 + sigma_data^2),

    so f(x, sigma) = c_skip x + c_out F(x, sigma) is the identity at sigma = sigma_min. sigma is
    the EDM / VE noise level (any shape, float); same as diffusers' CMStochasticIterativeScheduler.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out
