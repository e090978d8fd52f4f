"""Tests for genjax.diffusion.guidance against exact identities, DiT's forward_with_cfg (re-implemented
in numpy from facebookresearch/DiT models.py), diffusers' rescale_noise_cfg and an analytic classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.diffusion import guidance, schedules
from genjax.errors import UserError

B, H, W, C = 3, 4, 4, 2
NUM_CLASSES = 5


def _toy_denoiser(c_out=C, calls=None):
    """A denoiser that depends nonlinearly on x, t and the class label y (null id = NUM_CLASSES)."""
    table = jax.random.normal(jax.random.key(1), (NUM_CLASSES + 1, c_out))
    gain = jax.random.normal(jax.random.key(2), (c_out,))

    def denoise_fn(x, t, *, y):
        if calls is not None:
            calls.append(x.shape[0])
        t = jnp.broadcast_to(t, x.shape[:1]).astype(jnp.float32)
        # Elementwise only, so the 2B-batch call gives bitwise the same rows as a B-batch call.
        h = jnp.tanh(jnp.tile(x, (1, 1, 1, c_out // C)) * gain) * (1 + t[:, None, None, None] / 1000.0)
        return h + table[y][:, None, None, :]

    return denoise_fn


def _inputs():
    x = jax.random.normal(jax.random.key(0), (B, H, W, C))
    t = jnp.array([10, 500, 999])
    y = jnp.array([0, 3, 4])
    return x, t, y


@pytest.mark.parametrize("scale,expect", [(1.0, "cond"), (0.0, "uncond")])
def test_cfg_scale_one_and_zero_are_exact(scale, expect):
    fn = _toy_denoiser()
    x, t, y = _inputs()
    out = guidance.cfg_denoiser(fn, scale, null_cond={"y": NUM_CLASSES})(x, t, y=y)
    ref = fn(x, t, y=y) if expect == "cond" else fn(x, t, y=jnp.full_like(y, NUM_CLASSES))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_cfg_makes_one_batched_call():
    calls = []
    fn = _toy_denoiser(calls=calls)
    x, t, y = _inputs()
    guided = jax.jit(guidance.cfg_denoiser(fn, 4.0, null_cond={"y": NUM_CLASSES}))
    guided(x, t, y=y)
    assert calls == [2 * B]


@pytest.mark.parametrize("guide_channels", [3, 4, None])
def test_cfg_matches_dit_forward_with_cfg(guide_channels):
    """DiT: model_out on cat([x, x]) with y = cat([y, null]); eps, rest = out[:, :g], out[:, g:];
    half_eps = uncond + s (cond - uncond); the sampler keeps the first (conditional) half."""
    c_out = 2 * 4  # 4 latent channels + 4 learned-sigma channels, as DiT
    table = np.asarray(jax.random.normal(jax.random.key(3), (NUM_CLASSES + 1, c_out)))

    def denoise_fn(x, t, *, y):
        return jnp.tanh(jnp.concatenate([x, x], -1) * 1.5) + jnp.asarray(table)[y][:, None, None, :]

    x = jax.random.normal(jax.random.key(0), (B, H, W, 4))
    t = jnp.array([1, 2, 3])
    y = jnp.array([0, 1, 2])
    scale = 4.0
    out = guidance.cfg_denoiser(denoise_fn, scale, null_cond={"y": NUM_CLASSES},
                                guide_channels=guide_channels)(x, t, y=y)

    # numpy DiT forward_with_cfg, channels-first like the original.
    xn = np.moveaxis(np.asarray(x), -1, 1)
    combined = np.concatenate([xn, xn], 0)
    y2 = np.concatenate([np.asarray(y), np.full(B, NUM_CLASSES)])
    model_out = np.tanh(np.concatenate([combined, combined], 1) * 1.5) + table[y2][:, :, None, None]
    g = c_out if guide_channels is None else guide_channels
    eps, rest = model_out[:, :g], model_out[:, g:]
    cond_eps, uncond_eps = np.split(eps, 2, axis=0)
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    ref = np.concatenate([np.concatenate([half_eps, half_eps], 0), rest], 1)[:B]
    np.testing.assert_allclose(np.asarray(out), np.moveaxis(ref, 1, -1), rtol=1e-5, atol=1e-5)


def test_guidance_rescale_matches_diffusers():
    import torch
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    fn = _toy_denoiser()
    x, t, y = _inputs()
    scale, phi = 7.5, 0.7
    out = guidance.cfg_denoiser(fn, scale, null_cond={"y": NUM_CLASSES}, guidance_rescale=phi)(x, t, y=y)
    cond = torch.from_numpy(np.asarray(fn(x, t, y=y), np.float64))
    uncond = torch.from_numpy(np.asarray(fn(x, t, y=jnp.full_like(y, NUM_CLASSES)), np.float64))
    ref = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_cfg_per_example_scale_and_dict_cond():
    """A (B,) cfg_scale guides each example with its own scale; keys absent from null_cond are shared."""
    def denoise_fn(x, t, *, text, fps):
        return x * text[:, None, None, :1] + fps[:, None, None, None]

    x, t, _ = _inputs()
    text = jax.random.normal(jax.random.key(5), (B, 1, 3))[:, 0]
    fps = jnp.array([8.0, 16.0, 24.0])
    scales = jnp.array([0.0, 1.0, 3.0])
    out = guidance.cfg_denoiser(denoise_fn, scales, null_cond={"text": jnp.zeros((1, 3))})(
        x, t, text=text, fps=fps)
    cond, uncond = denoise_fn(x, t, text=text, fps=fps), denoise_fn(x, t, text=0 * text, fps=fps)
    ref = uncond + scales[:, None, None, None] * (cond - uncond)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_cfg_bad_inputs():
    fn = _toy_denoiser()
    x, t, y = _inputs()
    with pytest.raises(UserError, match="guidance_rescale"):
        guidance.cfg_denoiser(fn, 4.0, null_cond={"y": 0}, guidance_rescale=1.5)
    with pytest.raises(UserError, match="guide_channels"):
        guidance.cfg_denoiser(fn, 4.0, null_cond={"y": 0}, guide_channels=0)
    with pytest.raises(UserError, match="cfg_scale"):
        guidance.cfg_denoiser(fn, float("nan"), null_cond={"y": 0})
    with pytest.raises(UserError, match="guide_channels"):
        guidance.cfg_denoiser(fn, 4.0, null_cond={"y": 0}, guide_channels=C + 1)(x, t, y=y)
    with pytest.raises(UserError, match="null_cond"):
        guidance.cfg_denoiser(fn, 4.0, null_cond={"label": 0})(x, t, y=y)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_classifier_guidance_with_gaussian_classifier(prediction_type):
    """log p(y | x) = -|x - mu_y|^2 / (2 s^2) + const has gradient -(x - mu_y) / s^2; the guided
    eps must be eps - sqrt(1 - alphas_cumprod[t]) * scale * gradient (ADM Alg. 2)."""
    schedule = schedules.make("linear", 1000, prediction_type=prediction_type)
    mus = jax.random.normal(jax.random.key(7), (NUM_CLASSES, H, W, C))
    std = 0.7

    def log_prob_fn(x, t, *, y):
        return -jnp.sum((x - mus[y]) ** 2, axis=(1, 2, 3)) / (2 * std**2) + 3.0

    # The denoiser returns a fixed eps in the schedule's parameterisation, plus learned-sigma channels.
    x, t, y = _inputs()
    eps = jax.random.normal(jax.random.key(8), x.shape)
    extra = jax.random.normal(jax.random.key(9), x.shape)
    ac = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    a, s = np.sqrt(ac), np.sqrt(1 - ac)
    xn, en = np.asarray(x, np.float64), np.asarray(eps, np.float64)
    x0 = (xn - s * en) / a
    model_pred = {"epsilon": en, "sample": x0, "v_prediction": a * en - s * x0}[prediction_type]

    def denoise_fn(x_t, t, *, y):
        return jnp.concatenate([jnp.asarray(model_pred, jnp.float32), extra], -1)

    scale = 2.5
    out = jax.jit(guidance.classifier_guidance_denoiser(
        denoise_fn, log_prob_fn, scale, schedule=schedule))(x, t, y=y)

    grad = -(xn - np.asarray(mus)[np.asarray(y)]) / std**2
    eps_g = en - s * scale * grad
    x0_g = (xn - s * eps_g) / a
    ref = {"epsilon": eps_g, "sample": x0_g, "v_prediction": a * eps_g - s * x0_g}[prediction_type]
    np.testing.assert_allclose(np.asarray(out[..., :C]), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out[..., C:]), np.asarray(extra))
