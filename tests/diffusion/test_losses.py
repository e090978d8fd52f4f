"""Tests for genjax.diffusion.losses.

References: direct float64 numpy computations with the same t / noise draws (the documented
`t_rng, noise_rng = jax.random.split(rng)` split), diffusers' `compute_snr` for min-SNR weights, a
numpy port of openai improved-diffusion's `normal_kl`, `discretized_gaussian_log_likelihood`,
`q_posterior_mean_variance`, LEARNED_RANGE `p_mean_variance` and `_vb_terms_bpd`, and an exactly
solvable consistency-model toy (a point-mass data distribution, whose PF-ODE is straight in x / alpha).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.diffusion import distillation, losses, schedules
from genjax.errors import UserError

B, H, W, C = 6, 3, 3, 2


def _draws(rng, shape, num_timesteps):
    """The documented draws: t_rng, noise_rng = split(rng); t ~ randint(0, T); noise ~ N(0, 1)."""
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (shape[0],), 0, num_timesteps)
    return np.asarray(t), np.asarray(jax.random.normal(noise_rng, shape), np.float64)


def _np_alpha_sigma(schedule, t, ndim):
    ac = np.asarray(schedule.alphas_cumprod, np.float64)[t].reshape((-1,) + (1,) * (ndim - 1))
    return np.sqrt(ac), np.sqrt(1 - ac)


GAIN = np.array([0.7, -1.3, 0.4, 0.9])


def _toy_denoiser(c_out=C):
    """Elementwise, nonlinear in x_t and t; the same formula is evaluated in numpy below."""
    def fn(x, t):
        scale = 1 + jnp.asarray(t, jnp.float32)[:, None, None, None] / 1000
        return jnp.tanh(jnp.tile(x, (1, 1, 1, c_out // C)) * jnp.asarray(GAIN[:c_out], jnp.float32)) * scale
    return fn


def _np_toy_denoiser(x, t, c_out=C):
    return np.tanh(np.tile(x, (1, 1, 1, c_out // C)) * GAIN[:c_out]) * (1 + t[:, None, None, None] / 1000)


def _x0(key=0, shape=(B, H, W, C)):
    """8-bit images scaled to [-1, 1], so the decoder NLL's edge bins are exercised too."""
    u8 = jax.random.randint(jax.random.key(key), shape, 0, 256)
    return (u8.astype(jnp.float32) / 127.5 - 1.0).at[0, 0, 0, 0].set(-1.0).at[0, 0, 0, 1].set(1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_equals_numpy_and_perfect_predictor_is_zero(prediction_type):
    schedule = schedules.make("cosine", 1000, prediction_type=prediction_type)
    x0, rng = _x0(), jax.random.key(3)

    def oracle(x_t, t):
        """Knows x0, so it predicts the exact target from x_t alone."""
        alpha, sigma = (a.reshape(-1, 1, 1, 1) for a in schedules.alpha_sigma(schedule, t))
        return {"epsilon": (x_t - alpha * x0) / sigma, "sample": x0 * jnp.ones_like(x_t),
                "v_prediction": (alpha * x_t - x0) / sigma}[prediction_type]

    (loss, metrics), (oracle_loss, _) = jax.jit(lambda: tuple(
        losses.diffusion_loss(fn, x0, rng, schedule=schedule) for fn in (_toy_denoiser(), oracle)))()

    t, noise = _draws(rng, x0.shape, 1000)
    a, s = _np_alpha_sigma(schedule, t, 4)
    x0n = np.asarray(x0, np.float64)
    x_t = a * x0n + s * noise
    target = {"epsilon": noise, "sample": x0n, "v_prediction": a * noise - s * x0n}[prediction_type]
    ref = np.mean((_np_toy_denoiser(x_t, t) - target) ** 2)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(metrics["mse"]) == float(loss)
    assert float(oracle_loss) < 1e-8


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_matches_diffusers_compute_snr(prediction_type):
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    schedule = schedules.make("linear", 1000, prediction_type=prediction_type)
    gamma = 5.0
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              prediction_type=prediction_type)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.asarray(schedule.alphas_cumprod),
                               rtol=1e-5)
    # diffusers train_text_to_image.py: min(snr, gamma), then / snr (eps) or / (snr + 1) (v);
    # x0 targets keep min(snr, gamma) (Hang et al. 2023, Sec. 3.4).
    timesteps = torch.arange(1000)
    snr = compute_snr(scheduler, timesteps)
    ref = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        ref = ref / snr
    elif prediction_type == "v_prediction":
        ref = ref / (snr + 1)
    # ... and the loss weights each example's MSE with it.
    x0, rng = _x0(), jax.random.key(4)
    ac = jnp.asarray(schedule.alphas_cumprod)
    ours, (loss, metrics) = jax.jit(lambda: (
        losses.min_snr_weight(ac / (1 - ac), gamma, prediction_type),
        losses.diffusion_loss(_toy_denoiser(), x0, rng, schedule=schedule, weighting="min_snr",
                              min_snr_gamma=gamma)))()
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=2e-3)
    t, noise = _draws(rng, x0.shape, 1000)
    a, s = _np_alpha_sigma(schedule, t, 4)
    x0n = np.asarray(x0, np.float64)
    target = {"epsilon": noise, "sample": x0n, "v_prediction": a * noise - s * x0n}[prediction_type]
    per_example = np.mean((_np_toy_denoiser(a * x0n + s * noise, t) - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(loss), np.mean(ref.numpy()[t] * per_example), rtol=2e-3)
    np.testing.assert_allclose(float(metrics["mse"]), np.mean(per_example), rtol=1e-5)


# --- numpy port of openai improved-diffusion (losses.py and gaussian_diffusion.py), float64 ---

def _ref_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * np.exp(-logvar2))


def _ref_cdf(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def _ref_discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = _ref_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _ref_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return np.where(x < -0.999, log_cdf_plus,
                    np.where(x > 0.999, log_one_minus_cdf_min, np.log(np.maximum(cdf_delta, 1e-12))))


class _RefDiffusion:
    """GaussianDiffusion(model_mean_type=EPSILON, model_var_type=LEARNED_RANGE) in numpy."""

    def __init__(self, betas):
        self.betas = betas = np.asarray(betas, np.float64)
        alphas = 1.0 - betas
        self.ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, self.ac[:-1])
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - self.ac)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.coef1 = betas * np.sqrt(ac_prev) / (1.0 - self.ac)
        self.coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - self.ac)

    def _ex(self, arr, t):
        return arr[t][:, None, None, None]

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = self._ex(self.coef1, t) * x_start + self._ex(self.coef2, t) * x_t
        return mean, self._ex(self.posterior_variance, t), self._ex(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, model_output, x, t):
        model_output, model_var_values = np.split(model_output, 2, axis=-1)
        min_log = self._ex(self.posterior_log_variance_clipped, t)
        max_log = self._ex(np.log(self.betas), t)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._ex(np.sqrt(1.0 / self.ac), t) * x
                       - self._ex(np.sqrt(1.0 / self.ac - 1), t) * model_output)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return model_mean, model_log_variance

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance = self.p_mean_variance(model_output, x_t, t)
        kl = _ref_normal_kl(true_mean, true_log_variance_clipped, mean, log_variance)
        kl = kl.mean(axis=(1, 2, 3)) / np.log(2.0)
        decoder_nll = -_ref_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        decoder_nll = decoder_nll.mean(axis=(1, 2, 3)) / np.log(2.0)
        return np.where(t == 0, decoder_nll, kl)


def test_gaussian_pieces_match_openai():
    rs = np.random.RandomState(0)
    x = np.clip(np.round((rs.rand(4, 5) * 2 - 1) * 127.5) / 127.5, -1, 1)
    x[0, :2] = [-1.0, 1.0]
    # Bins of width 2/255 under Gaussians of std ~0.05 near x: probabilities well above the clamp.
    means, log_scales = x + 0.05 * rs.randn(4, 5), np.log(0.05) + 0.3 * rs.randn(4, 5)
    ours = jax.jit(losses.discretized_gaussian_log_likelihood)(
        jnp.asarray(x, jnp.float32), means=jnp.asarray(means, jnp.float32),
        log_scales=jnp.asarray(log_scales, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), _ref_discretized_gaussian_log_likelihood(
        x, means, log_scales), rtol=1e-4)
    args = [rs.randn(4, 5) for _ in range(4)]
    np.testing.assert_allclose(np.asarray(jax.jit(losses.normal_kl)(*(jnp.asarray(a, jnp.float32) for a in args))),
                               _ref_normal_kl(*args), rtol=1e-5, atol=1e-6)


def test_vb_terms_match_openai():
    schedule = schedules.make("linear", 1000)
    ref = _RefDiffusion(np.asarray(schedule.betas, np.float64))
    x0 = _x0(shape=(4, H, W, C))
    t = np.array([0, 1, 500, 999])
    noise = np.asarray(jax.random.normal(jax.random.key(1), x0.shape), np.float64)
    a, s = _np_alpha_sigma(schedule, t, 4)
    x_t = a * np.asarray(x0, np.float64) + s * noise
    # A model output near the truth, so that the KLs are O(1e-3 .. 1) and sensitive to errors.
    model_output = np.concatenate([noise + 0.1 * np.tanh(x_t), np.tanh(2 * x_t)], -1)

    @jax.jit
    def vb(model_output, x_t, t):
        mean, log_variance, _ = losses.p_mean_variance_learned_range(schedule, model_output, x_t, t)
        return losses.vb_terms_bpd(schedule, mean, log_variance, x0, x_t, t)

    ours = vb(jnp.asarray(model_output, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    expected = ref.vb_terms_bpd(model_output, np.asarray(x0, np.float64), x_t, t)
    np.testing.assert_allclose(np.asarray(ours).mean(axis=(1, 2, 3)), expected, rtol=2e-3)


def test_hybrid_loss_matches_openai_and_vlb_trains_only_the_variance():
    schedule = schedules.make("linear", 1000)
    ref = _RefDiffusion(np.asarray(schedule.betas, np.float64))
    x0, rng = _x0(), jax.random.key(5)

    def denoise_fn(params, x, t):
        w_mean, w_var = params
        return jnp.concatenate([jnp.tanh(x * w_mean), jnp.tanh(x * w_var)], -1)

    def mse_only(p):
        t_rng, noise_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, (B,), 0, 1000)
        noise = jax.random.normal(noise_rng, x0.shape)
        return jnp.mean((denoise_fn(p, schedules.q_sample(schedule, x0, t, noise), t)[..., :C] - noise) ** 2)

    params = (jnp.array([0.8, -0.5]), jnp.array([0.3, 1.1]))
    hybrid = lambda p: losses.diffusion_loss(  # noqa: E731
        lambda x, t: denoise_fn(p, x, t), x0, rng, schedule=schedule, learn_sigma=True, vlb_weight=2.0)
    ((loss, metrics), g_hybrid), g_mse = jax.jit(lambda p: (
        jax.value_and_grad(hybrid, has_aux=True)(p), jax.grad(mse_only)(p)))(params)

    t, noise = _draws(rng, x0.shape, 1000)
    a, s = _np_alpha_sigma(schedule, t, 4)
    x0n = np.asarray(x0, np.float64)
    x_t = a * x0n + s * noise
    model_output = np.concatenate([np.tanh(x_t * np.asarray(params[0])),
                                   np.tanh(x_t * np.asarray(params[1]))], -1)
    mse = np.mean((model_output[..., :C] - noise) ** 2)
    vb = np.mean(ref.vb_terms_bpd(model_output, x0n, x_t, t))
    np.testing.assert_allclose(float(metrics["mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["vb"]), vb, rtol=2e-3)
    np.testing.assert_allclose(float(loss), mse + 2.0 * vb, rtol=2e-3)

    assert all(np.isfinite(np.asarray(g)).all() for g in g_hybrid)
    assert np.abs(np.asarray(g_hybrid[1])).max() > 0
    np.testing.assert_allclose(np.asarray(g_hybrid[0]), np.asarray(g_mse[0]), rtol=1e-5)


def test_mask_excludes_elements_from_loss_and_gradient():
    """Videos (B, T, H, W, C) with per-frame validity: the masked loss equals the numpy mean over
    valid frames, and masked frames get exactly zero gradient and cannot change the loss."""
    schedule = schedules.make("linear", 1000)
    frames = 4
    x0 = jax.random.normal(jax.random.key(0), (3, frames, 2, 2, C))
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)[:, :, None, None, None]
    rng = jax.random.key(6)

    def fn(x, t):
        return jnp.tanh(x * jnp.asarray([0.5, -1.5]))

    loss_and_grad = jax.jit(jax.value_and_grad(lambda x: losses.diffusion_loss(
        fn, x, rng, schedule=schedule, weighting="min_snr", mask=mask)[0]))
    loss, grad = loss_and_grad(x0)
    t, noise = _draws(rng, x0.shape, 1000)
    a, s = _np_alpha_sigma(schedule, t, 5)
    x_t = a * np.asarray(x0, np.float64) + s * noise
    snr = a[:, 0, 0, 0, 0] ** 2 / s[:, 0, 0, 0, 0] ** 2
    w = np.minimum(snr, 5.0) / snr
    sq = (np.tanh(x_t * np.array([0.5, -1.5])) - noise) ** 2 * w[:, None, None, None, None]
    m = np.broadcast_to(np.asarray(mask), sq.shape)
    np.testing.assert_allclose(float(loss), (sq * m).sum() / m.sum(), rtol=2e-3)

    masked = np.broadcast_to(np.asarray(mask) == 0, x0.shape)
    assert (np.asarray(grad)[masked] == 0).all()
    assert (np.asarray(grad)[~masked] != 0).any()
    assert float(loss_and_grad(jnp.where(masked, 1e3, x0))[0]) == float(loss)


def test_flow_matching_loss_equals_numpy():
    x0, rng = jax.random.normal(jax.random.key(0), (B, H, W, C)), jax.random.key(7)
    seen = {}

    def fn(x, t):
        seen["t"] = t
        return _toy_denoiser()(x, t)

    for sampling in ["uniform", "logit_normal"]:
        loss, _ = losses.flow_matching_loss(fn, x0, rng, timestep_sampling=sampling,
                                            logit_mean=0.3, logit_std=0.8)
        t_rng, noise_rng = jax.random.split(rng)
        if sampling == "uniform":
            s = np.asarray(jax.random.uniform(t_rng, (B,)), np.float64)
        else:
            s = 1 / (1 + np.exp(-(0.3 + 0.8 * np.asarray(jax.random.normal(t_rng, (B,)), np.float64))))
        noise = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64)
        x0n = np.asarray(x0, np.float64)
        sb = s[:, None, None, None]
        x_s = (1 - sb) * x0n + sb * noise
        np.testing.assert_allclose(np.asarray(seen["t"]), s * 1000, rtol=1e-5)
        ref = np.mean((_np_toy_denoiser(x_s, s * 1000) - (noise - x0n)) ** 2)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_diffusion_loss_on_a_flow_schedule_is_flow_matching_with_a_per_example_shift():
    """The one training loss dispatches a flow schedule to flow matching; a per-example shift
    (two example sizes in one packed batch) moves each example's time as SD3 eq. 23, in NumPy."""
    x0, rng = jax.random.normal(jax.random.key(0), (B, H, W, C)), jax.random.key(7)
    shift = np.linspace(1.0, 3.0, B)
    seen = {}

    def fn(x, t):
        seen["t"] = t
        return _toy_denoiser()(x, t)

    loss, metrics = losses.diffusion_loss(fn, x0, rng, schedule=schedules.make("flow", 1000),
                                          timestep_sampling="logit_normal", logit_std=0.8, shift=shift)
    t_rng, noise_rng = jax.random.split(rng)
    u = 1 / (1 + np.exp(-0.8 * np.asarray(jax.random.normal(t_rng, (B,)), np.float64)))
    s = shift * u / (1 + (shift - 1) * u)
    np.testing.assert_allclose(np.asarray(seen["t"]), s * 1000, rtol=1e-5)
    noise, x0n = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64), np.asarray(x0, np.float64)
    x_s = (1 - s[:, None, None, None]) * x0n + s[:, None, None, None] * noise
    ref = np.mean((_np_toy_denoiser(x_s, s * 1000) - (noise - x0n)) ** 2)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert set(metrics) == {"loss", "mse"}
    same, _ = losses.flow_matching_loss(fn, x0, rng, timestep_sampling="logit_normal", logit_std=0.8, shift=shift)
    assert float(same) == float(loss)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="flow", learn_sigma=True), r"^learn_sigma=True: must be False with a flow schedule"),
    (dict(schedule="flow", weighting="min_snr"), r"^weighting='min_snr': must be 'none' with a flow"),
    (dict(schedule="flow", shift=np.array([1.0, 0.0])), r"^shift=0\.0: must be > 0"),
    (dict(schedule="linear", timestep_sampling="logit_normal"), r"^timestep_sampling='logit_normal': must be 'uniform'"),
    (dict(schedule="linear", shift=3.0), r"^shift=3\.0: must be 1 with a variance-preserving schedule"),
])
def test_diffusion_loss_refuses_options_of_the_other_objective(kwargs, message):
    name = kwargs.pop("schedule")
    with pytest.raises(UserError, match=message):
        losses.diffusion_loss(lambda x, t: x, jnp.zeros((2, 4, 4, 1)), jax.random.key(0),
                              schedule=schedules.make(name, 10), **kwargs)


@pytest.mark.parametrize("name", ["linear", "flow"])
def test_packed_loss_draws_one_time_per_example_and_ignores_padding(name):
    """Two rows of packed tokens (examples of 3 + 4 tokens, and 5; padding after): each example
    slot gets its own time, every token its example's, padding is out of the loss; NumPy."""
    schedule = schedules.make(name, 1000)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    x0 = jax.random.normal(jax.random.key(0), (2, 8, 3))
    rng, seen = jax.random.key(4), {}

    def fn(x, t):  # token-wise, per-slot time gathered by segment id
        seen["t"] = t
        per_token = jnp.take_along_axis(jnp.asarray(t, jnp.float32), jnp.clip(seg - 1, 0, 1), axis=1)
        return jnp.tanh(x) * (1 + per_token[..., None] / 1000)

    loss, _ = losses.diffusion_loss(fn, x0, rng, schedule=schedule, segment_ids=seg, max_per_seq=2)
    padded = jnp.where(jnp.asarray(seg)[..., None] > 0, x0, 1e3)
    assert float(losses.diffusion_loss(fn, padded, rng, schedule=schedule, segment_ids=seg, max_per_seq=2)[0]) \
        == float(loss)
    t = np.asarray(seen["t"], np.float64)
    assert t.shape == (2, 2)
    t_rng, noise_rng = jax.random.split(rng)
    noise, x = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64), np.asarray(x0, np.float64)
    t_tok = np.take_along_axis(t, np.clip(seg - 1, 0, 1), axis=1)[..., None]
    if name == "flow":
        np.testing.assert_allclose(t, np.asarray(jax.random.uniform(t_rng, (2, 2))) * 1000, rtol=1e-6)
        s = t_tok / 1000
        x_t, target = (1 - s) * x + s * noise, noise - x
    else:
        np.testing.assert_array_equal(t, np.asarray(jax.random.randint(t_rng, (2, 2), 0, 1000)))
        ac = np.asarray(schedule.alphas_cumprod, np.float64)[t_tok.astype(int)]
        x_t, target = np.sqrt(ac) * x + np.sqrt(1 - ac) * noise, noise
    err = (np.tanh(x_t) * (1 + t_tok / 1000) - target) ** 2
    np.testing.assert_allclose(float(loss), err[seg > 0].mean(), rtol=2e-5)


def test_logit_normal_timesteps_distribution():
    n = 8192
    seen = {}

    def fn(x, t):
        seen["t"] = t
        return x

    losses.flow_matching_loss(fn, jnp.zeros((n, 1)), jax.random.key(8),
                              timestep_sampling="logit_normal", logit_mean=-0.5, logit_std=1.5)
    s = np.asarray(seen["t"], np.float64) / 1000
    logit = np.log(s) - np.log1p(-s)
    se = 1.5 / math.sqrt(n)
    assert abs(logit.mean() - (-0.5)) < 4 * se
    assert abs(logit.std() - 1.5) < 4 * 1.5 / math.sqrt(2 * n)


# --- consistency distillation ---------------------------------------------------------------

def _np_consistency(x0_pred, x_t, a, s, sigma_min, sigma_data=0.5):
    """The documented f in numpy: VE variables x~ = x_t / a, sigma~ = s / a; EDM's F for the
    x0 prediction; Song et al. 2023's boundary scalings."""
    x_ve, sig = x_t / a, s / a
    c_skip_edm = sigma_data**2 / (sig**2 + sigma_data**2)
    c_out_edm = sigma_data * sig / np.sqrt(sig**2 + sigma_data**2)
    c_skip = sigma_data**2 / ((sig - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sig - sigma_min) / np.sqrt(sig**2 + sigma_data**2)
    return c_skip * x_ve + c_out * (x0_pred - c_skip_edm * x_ve) / c_out_edm


def test_consistency_boundary_condition_is_exact():
    schedule = schedules.make("linear", 1000)
    x_t = jax.random.normal(jax.random.key(0), (B, H, W, C))
    t = jnp.zeros((B,), jnp.int32)
    f1, f2 = jax.jit(lambda: [distillation.consistency_function(fn, x_t, t, schedule=schedule)
                              for fn in (_toy_denoiser(), lambda x, t: 100 * x + 3.0)])()
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))  # c_out(sigma_min) == 0 exactly
    alpha0 = math.sqrt(float(schedule.alphas_cumprod[0]))
    np.testing.assert_allclose(np.asarray(f1), np.asarray(x_t) / alpha0, rtol=2.5e-7)  # 2 ulp


@pytest.mark.parametrize("distance", ["l2", "pseudo_huber"])
def test_consistency_distillation_loss_equals_numpy(distance):
    schedule = schedules.make("linear", 1000, prediction_type="v_prediction")
    x0, rng, num_steps = _x0(), jax.random.key(9), 50
    teacher = lambda x, t: 0.3 * x  # noqa: E731
    student = _toy_denoiser()
    target = lambda x, t: _toy_denoiser()(x, t) * 0.9  # noqa: E731
    loss, _ = jax.jit(lambda: distillation.consistency_distillation_loss(
        student, target, teacher, x0, rng, schedule=schedule, num_steps=num_steps,
        distance=distance))()
    n, noise = _draws(rng, x0.shape, num_steps)
    t_hi = (n + 1) * 20 - 1
    t_lo = np.maximum(t_hi - 20, 0)
    a_hi, s_hi = _np_alpha_sigma(schedule, t_hi, 4)
    a_lo, s_lo = _np_alpha_sigma(schedule, t_lo, 4)
    x_hi = a_hi * np.asarray(x0, np.float64) + s_hi * noise
    v = 0.3 * x_hi  # teacher v-prediction -> x0 = a x - s v, eps = s x + a v
    x_lo = a_lo * (a_hi * x_hi - s_hi * v) + s_lo * (s_hi * x_hi + a_hi * v)
    sigma_min = _np_alpha_sigma(schedule, np.array([0]), 1)
    sigma_min = float(sigma_min[1][0] / sigma_min[0][0])

    def f(out, x, a, s):
        return _np_consistency(a * x - s * out, x, a, s, sigma_min)

    pred = f(_np_toy_denoiser(x_hi, t_hi), x_hi, a_hi, s_hi)
    tgt = f(0.9 * _np_toy_denoiser(x_lo, t_lo), x_lo, a_lo, s_lo)
    if distance == "l2":
        ref = np.mean((pred - tgt) ** 2)
    else:
        c = 0.00054 * math.sqrt(H * W * C)
        ref = np.mean(np.sqrt(((pred - tgt) ** 2).sum(axis=(1, 2, 3)) + c**2) - c)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)


def test_consistency_distillation_loss_is_zero_for_the_exact_consistency_function():
    """Data = a point mass at mu: the teacher's exact x0 prediction is mu, the PF-ODE paths are
    x~ = mu + sigma~ z, so one DDIM step is exact and f*(x~, sigma~) = mu + (x~ - mu) sigma_min /
    sigma~. A student whose consistency function is f* has zero CD loss; the teacher does not."""
    schedule = schedules.make("linear", 1000)  # epsilon prediction
    mu = _x0(1, (1, H, W, C))
    x0 = jnp.broadcast_to(mu, (B, H, W, C))
    ac = schedule.alphas_cumprod
    sigma_min = jnp.sqrt(1 - ac[0]) / jnp.sqrt(ac[0])
    sd = 0.5

    def alpha_sigma(t):
        return jnp.sqrt(ac[t])[:, None, None, None], jnp.sqrt(1 - ac[t])[:, None, None, None]

    def teacher(x, t):  # exact eps for a point mass
        a, s = alpha_sigma(t)
        return (x - a * mu) / s

    def exact_student(x, t):
        """Solve f = c_skip x~ + c_out (D - c_skip_edm x~) / c_out_edm = f* for D, return its eps."""
        a, s = alpha_sigma(t)
        x_ve, sig = x / a, s / a
        f_star = mu + (x_ve - mu) * sigma_min / sig
        ratio = (sig - sigma_min) / sig  # c_out / c_out_edm
        c_skip = sd**2 / ((sig - sigma_min) ** 2 + sd**2)
        c_skip_edm = sd**2 / (sig**2 + sd**2)
        d = jnp.where(ratio > 0, (f_star - (c_skip - ratio * c_skip_edm) * x_ve)
                      / jnp.where(ratio > 0, ratio, 1.0), mu)
        return (x - a * d) / s

    exact, wrong = jax.jit(lambda: [distillation.consistency_distillation_loss(
        student, student, teacher, x0, jax.random.key(10), schedule=schedule, num_steps=50)[0]
        for student in (exact_student, lambda x, t: exact_student(x, t) + 0.05)])()
    assert float(exact) < 1e-10
    assert float(wrong) > 1e-4


def test_bad_inputs_raise_user_error():
    schedule = schedules.make("linear", 10)
    x0, rng = jnp.zeros((2, 4, 4, 3)), jax.random.key(0)
    fn = lambda x, t: x  # noqa: E731
    cases = [
        (dict(weighting="snr"), "weighting"),
        (dict(weighting="min_snr", min_snr_gamma=-1.0), "min_snr_gamma"),
        (dict(vlb_weight=-1.0), "vlb_weight"),
        (dict(mask=jnp.ones((2, 5))), "mask"),
        (dict(learn_sigma=True), "model_output.shape"),  # 3 channels out, 6 needed
    ]
    # jax.eval_shape traces without compiling: every error is raised before anything compiles.
    for kwargs, field in cases:
        with pytest.raises(UserError, match=field):
            jax.eval_shape(lambda: losses.diffusion_loss(fn, x0, rng, schedule=schedule, **kwargs))
    others = [
        (lambda: losses.diffusion_loss(fn, x0, rng, schedule=schedule, segment_ids=jnp.ones((2, 4))),
         "segment_ids.shape"),  # packed x0 is (S, L, P)
        (lambda: losses.diffusion_loss(fn, x0[:, 0], rng, schedule=schedule, segment_ids=jnp.ones((2, 4))),
         "max_per_seq"),
        (lambda: losses.flow_matching_loss(fn, x0, rng, timestep_sampling="cosmap"),
         "timestep_sampling"),
        (lambda: losses.flow_matching_loss(fn, x0, rng, timestep_sampling="logit_normal",
                                           logit_std=0.0), "logit_std"),
        (lambda: distillation.consistency_distillation_loss(fn, fn, fn, x0, rng, schedule=schedule,
                                                            num_steps=11), "num_steps"),
        (lambda: distillation.consistency_distillation_loss(fn, fn, fn, x0, rng, schedule=schedule,
                                                            num_steps=5, distance="l1"), "distance"),
    ]
    for call, field in others:
        with pytest.raises(UserError, match=field):
            jax.eval_shape(call)
