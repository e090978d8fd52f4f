"""Training objectives: eps / x0 / v regression with min-SNR weighting, improved-DDPM learned variance
(hybrid loss with the VLB) and rectified-flow matching (consistency distillation is in
`genjax.diffusion.distillation`).

Every loss takes a denoiser `denoise_fn(x_t, t, **cond) -> model_output` that closes over its
parameters (e.g. `lambda x, t, **c: model.apply({"params": p}, x, t, **c)`), clean data
`x0 (B, ...)` of any rank (images (B, H, W, C), videos (B, T, H, W, C), tokens (B, L, D)) and
one PRNG key, and returns `(loss, metrics)`: a float32 scalar and a dict of float32 scalars.
All are pure, jittable and differentiable with respect to what denoise_fn closes over.

Reduction: an optional `mask` broadcastable to x0's shape (1 = counts, 0 = ignored; e.g. (B, T, 1, 1, 1)
for valid frames or (B, L, 1) for non-padding tokens) restricts every elementwise term;
loss = sum_b w_b sum_e mask * term / sum(mask), which without a mask is the batch mean of the
per-example weighted mean over non-batch dims (diffusers' training scripts, openai `mean_flat`).
Masked elements are selected out (`jnp.where`), so their values do not reach the loss and
(where finite) get exactly zero gradient.

Randomness: each loss splits `rng` once, `t_rng, noise_rng = jax.random.split(rng)`, draws the
timesteps from t_rng with shape (B,) and `noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)`.

Packed batches (NaViT, `genjax.data.packing`): with `segment_ids (S, L)` (0 = padding, j + 1 =
example slot j) and `max_per_seq` M, x0 is `(S, L, P)` packed tokens; timesteps are drawn per
example slot, shape (S, M), each token gets its example's, the denoiser is called with t (S, M)
(e.g. `VideoDiT.packed`), and padding is masked out. The loss is then the mean over the real
tokens' elements, so a larger example weighs more (as a token-level loss over a packed batch).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from genjax.diffusion import schedules
from genjax.errors import check

Denoiser = Callable[..., jax.Array]

WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) of rank `ndim`."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _per_example(x0: jax.Array, segment_ids: Any, max_per_seq: int | None, mask: Any):
    """`(shape of the per-example draws, expand: per-example values -> broadcastable to x0, mask)`:
    (B,) and `_bcast` for a plain batch; (S, M), a gather by slot to (S, L, 1) and the mask
    restricted to real tokens for a packed one."""
    _check_mask(mask, x0)
    if segment_ids is None:
        return (x0.shape[0],), lambda a: _bcast(a, x0.ndim), mask
    check(x0.ndim == 3 and tuple(jnp.shape(segment_ids)) == x0.shape[:2], "segment_ids.shape",
          tuple(jnp.shape(segment_ids)), f"must be (S, L) of packed x0 (S, L, P) {tuple(x0.shape)}")
    check(isinstance(max_per_seq, int) and max_per_seq >= 1, "max_per_seq", max_per_seq,
          "must be an int >= 1 with segment_ids")
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    slot = jnp.clip(segment_ids - 1, 0, max_per_seq - 1)
    tokens = (segment_ids > 0)[..., None]
    mask = tokens if mask is None else tokens & (jnp.asarray(mask) != 0)
    return (x0.shape[0], max_per_seq), lambda a: jnp.take_along_axis(a, slot, axis=1)[..., None], mask


def _check_mask(mask: Any, x0: jax.Array) -> None:
    if mask is not None:
        shape = tuple(jnp.shape(mask))
        ok = len(shape) <= x0.ndim and all(m in (1, x) for m, x in zip(shape[::-1], x0.shape[::-1]))
        check(ok, "mask.shape", shape, f"must broadcast to x0's shape {tuple(x0.shape)}")


def _masked_mean(term: jax.Array, mask: Any, weight: jax.Array | None = None) -> jax.Array:
    """sum_b weight_b sum_e mask * term / sum(mask) in float32 (see the module docstring)."""
    term = term.astype(jnp.float32)
    if weight is not None:
        term = _bcast(weight.astype(jnp.float32), term.ndim) * term
    if mask is None:
        return jnp.mean(term)
    mask = jnp.broadcast_to(jnp.asarray(mask) != 0, term.shape)
    return jnp.sum(jnp.where(mask, term, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# ----------------------------------------------------------------------------------------------
# Gaussian likelihood pieces (openai improved-diffusion `losses.py`, from Ho et al.'s diffusion_tf).

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting).

    Same formula as openai improved-diffusion `normal_kl`."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    """tanh approximation of the standard normal CDF used by openai's decoder likelihood."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) of 8-bit data under a Gaussian discretised into 256 bins of width 2/255 on [-1, 1],
    the edge bins extending to -inf / +inf (Ho et al. 2020 Sec. 3.3, the L_0 decoder). In nats,
    elementwise, shape of x.

    x: data in [-1, 1] (uint8 / 127.5 - 1); means, log_scales (log std): broadcastable to x.
    Same code as openai improved-diffusion `discretized_gaussian_log_likelihood` (tanh CDF
    approximation, probabilities clamped at 1e-12).
    """
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _posterior_coefs(schedule: schedules.Schedule):
    """(T,) float32 coefficients of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7), 1 - alphas_cumprod taken
    as -expm1(cumsum(log1p(-betas))) to avoid cancellation at small t."""
    betas, ac = schedule.betas, schedule.alphas_cumprod
    one_minus_ac = -jnp.expm1(jnp.cumsum(jnp.log1p(-betas)))
    ac_prev = jnp.concatenate([jnp.ones((1,), ac.dtype), ac[:-1]])
    one_minus_ac_prev = jnp.concatenate([jnp.zeros((1,), ac.dtype), one_minus_ac[:-1]])
    variance = betas * one_minus_ac_prev / one_minus_ac
    log_variance_clipped = jnp.log(jnp.concatenate([variance[1:2], variance[1:]]))
    coef_x0 = betas * jnp.sqrt(ac_prev) / one_minus_ac
    coef_xt = one_minus_ac_prev * jnp.sqrt(1.0 - betas) / one_minus_ac
    return coef_x0, coef_xt, variance, log_variance_clipped


def q_posterior_mean_variance(schedule: schedules.Schedule, x0: jax.Array, x_t: jax.Array,
                              t: jax.Array):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7).

    x0, x_t: (B, ...) float; t: (B,) int in [0, T). Returns mean (x_t's shape) and variance,
    log_variance_clipped of shape (B, 1, ..., 1) (float32); the log-variance at t = 0, where the
    variance is 0, is clipped to the value at t = 1. Equals openai improved-diffusion
    `GaussianDiffusion.q_posterior_mean_variance` (there computed in float64).
    """
    coef_x0, coef_xt, variance, log_variance = (
        _bcast(c[t], x_t.ndim) for c in _posterior_coefs(schedule))
    return coef_x0 * x0 + coef_xt * x_t, variance, log_variance


def p_mean_variance_learned_range(schedule: schedules.Schedule, model_output: jax.Array,
                                  x_t: jax.Array, t: jax.Array):
    """Mean, log-variance and x0 prediction of p(x_{t-1} | x_t) for a learned-range variance model
    (Nichol & Dhariwal 2021, "Improved DDPM", eq. 15; openai `p_mean_variance` with
    LEARNED_RANGE and clip_denoised=False).

    model_output: (B, ..., 2C) = [prediction of schedule.prediction_type, v], v in about [-1, 1];
    x_t: (B, ..., C); t: (B,) int. The log-variance is frac * log(beta_t) + (1 - frac) *
    log(posterior variance, clipped), frac = (v + 1) / 2, and the mean is the posterior mean at
    the predicted x0. Returns (mean, log_variance, x0) of x_t's shape.
    """
    c = x_t.shape[-1]
    pred, var_values = model_output[..., :c], model_output[..., c:]
    alpha, sigma = (_bcast(a, x_t.ndim) for a in schedules.alpha_sigma(schedule, t))
    x0, _ = schedules.to_x0_eps(pred, x_t, alpha, sigma, schedule.prediction_type)
    mean, _, min_log = q_posterior_mean_variance(schedule, x0, x_t, t)
    max_log = _bcast(jnp.log(schedule.betas)[t], x_t.ndim)
    frac = (var_values + 1) / 2
    return mean, frac * max_log + (1 - frac) * min_log, x0


def vb_terms_bpd(schedule: schedules.Schedule, model_mean: jax.Array, model_log_variance: jax.Array,
                 x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Elementwise variational-bound term L_{t-1} in bits (Ho et al. 2020 eq. 5; Improved DDPM
    Sec. 2): KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder
    NLL -log p(x0 | x_1) for t = 0, divided by log 2.

    Shapes: x0, x_t, model_mean, model_log_variance (B, ...); t (B,). Returns (B, ...) float;
    its mean over non-batch dims is openai improved-diffusion `_vb_terms_bpd(...)["output"]`
    (bits per dim). x0 must be in [-1, 1] for the decoder term to be a likelihood.
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean,
                                               log_scales=0.5 * model_log_variance)
    return jnp.where(_bcast(t == 0, x0.ndim), nll, kl) / math.log(2.0)


# ----------------------------------------------------------------------------------------------
# Losses.

def min_snr_weight(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient diffusion training via min-SNR
    weighting strategy", Sec. 3.4): min(snr, gamma) / snr for eps, min(snr, gamma) / (snr + 1) for
    v and min(snr, gamma) for x0 targets; snr = alphas_cumprod / (1 - alphas_cumprod). The eps
    weight is computed as min(1, gamma / snr), which is 1 (its limit) at snr = 0. As diffusers'
    train_text_to_image.py with `compute_snr`."""
    if prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / snr)
    clipped = jnp.minimum(snr, gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped


def diffusion_loss(denoise_fn: Denoiser, x0: jax.Array, rng: jax.Array, *,
                   schedule: schedules.Schedule, cond: Mapping[str, Any] | None = None,
                   weighting: str = "none", min_snr_gamma: float = 5.0, learn_sigma: bool = False,
                   vlb_weight: float = 1.0, mask: Any = None, timestep_sampling: str = "uniform",
                   logit_mean: float = 0.0, logit_std: float = 1.0, shift: Any = 1.0,
                   segment_ids: Any = None, max_per_seq: int | None = None) -> tuple[jax.Array, dict]:
    """The training loss of every diffusion task: a "flow" schedule is `flow_matching_loss` (with
    timestep_sampling, logit_mean, logit_std, shift, mask); any other schedule is the denoising
    loss at t ~ Uniform{0..T-1} (Ho et al. 2020 Alg. 1, "L_simple") described here.

    x_t = alpha_t x0 + sigma_t noise is passed as `denoise_fn(x_t, t, **cond)` with t (B,) int32,
    and its output is regressed (MSE) onto the target of schedule.prediction_type: noise
    ("epsilon"), x0 ("sample") or v = alpha_t noise - sigma_t x0 ("v_prediction", Salimans & Ho
    2022). weighting="min_snr" multiplies each example by `min_snr_weight`.

    With learn_sigma=True the model outputs 2C channels [prediction, v] and the loss is the hybrid
    L_simple + vlb_weight * L_vlb of Improved DDPM (Nichol & Dhariwal 2021, Sec. 3.1): L_vlb is
    `vb_terms_bpd` of `p_mean_variance_learned_range` with the prediction stop-gradiented, so the
    VLB trains only the variance. vlb_weight = 1 is DiT's / openai's LossType.MSE; the paper's
    lambda = 0.001 over T = 4000 terms is openai's RESCALED_MSE, vlb_weight = T / 1000.

    Args:
      x0: (B, ...) float clean data (in [-1, 1] for the VLB decoder term to be a likelihood).
      rng: PRNG key, split as in the module docstring.
      schedule: a VP `Schedule`, or a "flow" one (then see `flow_matching_loss`).
      cond: keyword inputs for denoise_fn (class labels, text embeddings, ...).
      min_snr_gamma: gamma > 0 (paper: 5).
      mask: optional 0/1 array broadcastable to x0 (see the module docstring).
      timestep_sampling, logit_mean, logit_std, shift: flow schedules only (`flow_matching_loss`);
        a VP schedule needs the defaults.
      segment_ids, max_per_seq: a packed batch (module docstring); t is then (S, M).

    Returns:
      (loss, {"loss", "mse", and with learn_sigma "vb" (bits per dim)}), float32 scalars; "mse" is
      unweighted.

    Raises:
      UserError: unknown weighting, min_snr_gamma <= 0, vlb_weight < 0, a mask that does not
        broadcast to x0, learn_sigma with T < 2 or (at trace time) an output that is not x0's
        shape, or not 2C channels with learn_sigma; with a flow schedule learn_sigma or min_snr
        weighting (flow has no VLB or SNR weighting here); with a VP schedule a timestep_sampling
        other than "uniform" or a shift other than 1; learn_sigma on a packed batch;
        segment_ids that are not (S, L) of x0 (S, L, P), max_per_seq < 1.
    """
    if schedule.is_flow:
        check(not learn_sigma, "learn_sigma", learn_sigma, "must be False with a flow schedule (no VLB)")
        check(weighting == "none", "weighting", weighting, "must be 'none' with a flow schedule")
        return flow_matching_loss(denoise_fn, x0, rng, cond=cond, timestep_sampling=timestep_sampling,
                                  logit_mean=logit_mean, logit_std=logit_std, shift=shift, mask=mask,
                                  segment_ids=segment_ids, max_per_seq=max_per_seq)
    check(timestep_sampling == "uniform", "timestep_sampling", timestep_sampling,
          "must be 'uniform' with a variance-preserving schedule (logit_normal is for 'flow')")
    check(isinstance(shift, (int, float)) and shift == 1, "shift", shift,
          "must be 1 with a variance-preserving schedule (the timestep shift is for 'flow')")
    check(weighting in WEIGHTINGS, "weighting", weighting, f"must be one of {WEIGHTINGS}")
    check(min_snr_gamma > 0, "min_snr_gamma", min_snr_gamma, "must be > 0")
    check(vlb_weight >= 0, "vlb_weight", vlb_weight, "must be >= 0")
    check(not learn_sigma or schedule.num_timesteps >= 2, "num_timesteps", schedule.num_timesteps,
          "must be >= 2 with learn_sigma (the clipped posterior variance uses t = 1)")
    check(not (learn_sigma and segment_ids is not None), "learn_sigma", learn_sigma,
          "is not supported on a packed batch (segment_ids)")
    shape, expand, mask = _per_example(x0, segment_ids, max_per_seq, mask)
    cond = {} if cond is None else cond

    t_rng, noise_rng = jax.random.split(rng)
    channels = x0.shape[-1]
    t = jax.random.randint(t_rng, shape, 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    alpha, sigma = (expand(a) for a in schedules.alpha_sigma(schedule, t))
    x_t = alpha * x0 + sigma * noise  # schedules.q_sample, per example
    out = denoise_fn(x_t, t, **cond)

    want = channels * (2 if learn_sigma else 1)
    check(out.shape == x0.shape[:-1] + (want,), "model_output.shape", tuple(out.shape),
          f"must be x0's shape with {want} channels" + (" (learn_sigma)" if learn_sigma else ""))
    pred = out[..., :channels]
    target = {"epsilon": noise, "sample": x0,
              "v_prediction": schedules.v_from_x0_eps(x0, noise, alpha, sigma)}[schedule.prediction_type]
    sq_err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2

    weight = None
    if weighting == "min_snr":
        ac = schedule.alphas_cumprod[t]
        weight = expand(min_snr_weight(ac / (1.0 - ac), min_snr_gamma, schedule.prediction_type))
    mse = _masked_mean(sq_err, mask)
    loss = mse if weight is None else _masked_mean(sq_err, mask, weight)
    metrics = {"mse": mse}
    if learn_sigma:
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), out[..., channels:]], axis=-1)
        mean, log_variance, _ = p_mean_variance_learned_range(
            schedule, frozen.astype(jnp.float32), x_t.astype(jnp.float32), t)
        vb = _masked_mean(vb_terms_bpd(schedule, mean, log_variance, x0.astype(jnp.float32),
                                       x_t.astype(jnp.float32), t), mask)
        loss = loss + vlb_weight * vb
        metrics["vb"] = vb
    metrics["loss"] = loss
    return loss, metrics


def flow_matching_loss(denoise_fn: Denoiser, x0: jax.Array, rng: jax.Array, *,
                       cond: Mapping[str, Any] | None = None, timestep_sampling: str = "uniform",
                       logit_mean: float = 0.0, logit_std: float = 1.0, shift: Any = 1.0,
                       mask: Any = None, segment_ids: Any = None,
                       max_per_seq: int | None = None) -> tuple[jax.Array, dict]:
    """Rectified-flow / conditional flow-matching loss (Lipman et al. 2023, eq. 23 with the
    straight path of Liu et al. 2023; Esser et al. 2024, "SD3", Sec. 2-3; Open-Sora's training).

    s ~ Uniform[0, 1) or, with timestep_sampling="logit_normal", s = sigmoid(logit_mean +
    logit_std * n), n ~ N(0, 1) (SD3 eq. 19, "lognorm(m, s)"), then shifted by
    `schedules.shift_flow_time(s, shift)` (SD3 eq. 23; `shift` a number or a (B,) array, one per
    example, e.g. `schedules.flow_shift_for` of each example's token count); x_s = (1 - s) x0 + s noise; the
    denoiser is called as `denoise_fn(x_s, s * 1000, **cond)` (float32 (B,) t, the SD3 /
    diffusers FlowMatchEulerDiscreteScheduler convention) and regressed onto the velocity
    noise - x0.

    Args:
      x0: (B, ...) float clean data; rng: PRNG key split as in the module docstring;
      cond: keyword inputs for denoise_fn; logit_std > 0; shift > 0 (1 = none; (S, M) per slot
        for a packed batch); mask: optional, broadcastable to x0.
      segment_ids, max_per_seq: a packed batch (module docstring); s is then (S, M).

    Returns:
      (loss, {"loss", "mse"}), float32 scalars (equal: flow matching has no weighting).

    Raises:
      UserError: unknown timestep_sampling, logit_std <= 0, a concrete shift <= 0, a mask that
        does not broadcast to x0, bad segment_ids / max_per_seq, or (at trace time) an output
        whose shape is not x0's.
    """
    check(timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling", timestep_sampling,
          f"must be one of {TIMESTEP_SAMPLINGS}")
    check(logit_std > 0, "logit_std", logit_std, "must be > 0")
    if not isinstance(shift, jax.core.Tracer):
        bad = [float(k) for k in np.ravel(np.asarray(shift, np.float64)) if not k > 0]
        check(not bad, "shift", bad[0] if bad else None, "must be > 0 (1 = no shift)")
    shape, expand, mask = _per_example(x0, segment_ids, max_per_seq, mask)
    cond = {} if cond is None else cond

    t_rng, noise_rng = jax.random.split(rng)
    if timestep_sampling == "uniform":
        s = jax.random.uniform(t_rng, shape)
    else:
        s = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(t_rng, shape))
    s = schedules.shift_flow_time(s, jnp.broadcast_to(jnp.asarray(shift, jnp.float32), shape))
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    e = expand(s.astype(x0.dtype))
    x_s = (1.0 - e) * x0 + e * noise  # schedules.flow_interpolate, per example
    out = denoise_fn(x_s, s * schedules.FLOW_TIME_SCALE, **cond)
    check(out.shape == x0.shape, "model_output.shape", tuple(out.shape),
          f"must equal x0's shape {tuple(x0.shape)}")
    sq_err = (out.astype(jnp.float32) - (noise - x0).astype(jnp.float32)) ** 2
    loss = _masked_mean(sq_err, mask)
    return loss, {"loss": loss, "mse": loss}
