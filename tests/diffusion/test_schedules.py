"""Schedules against diffusers' schedulers, openai's respacing, and exact identities."""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from genjax.diffusion import schedules as S
from genjax.errors import UserError

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("name", list(DIFFUSERS_NAME))
@pytest.mark.parametrize("rescale", [False, True])
def test_betas_match_diffusers(name, rescale):
    kw = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[name],
                                  rescale_betas_zero_snr=rescale, **kw)
    ours = S.make(name, 1000, rescale_zero_terminal_snr=rescale)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    ref_betas = diffusers.DDPMScheduler(num_train_timesteps=1000,
                                        beta_schedule=DIFFUSERS_NAME[name], **kw).betas.double()
    if rescale:  # diffusers rescales in float32 (1e-3 relative error on small betas); use float64
        ref_betas = rescale_zero_terminal_snr(ref_betas)
    np.testing.assert_allclose(ours.betas, ref_betas.numpy(), rtol=2e-6, atol=1e-7)
    assert ours.betas.dtype == jnp.float32 and ours.num_timesteps == 1000
    if rescale:
        assert float(ours.alphas_cumprod[-1]) == 0.0


def test_cosine_matches_improved_ddpm_definition():
    # Nichol & Dhariwal 2021 eq. 17: alphas_cumprod = f(t) / f(0) wherever no beta was clipped.
    t = np.arange(1, 1001) / 1000
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    ac = np.asarray(S.make("cosine", 1000).alphas_cumprod)
    np.testing.assert_allclose(ac[:990], (f(t) / f(0))[:990], rtol=1e-5)
    cont_alpha, _ = S.continuous_alpha_sigma("cosine", jnp.asarray(t[:990]))
    np.testing.assert_allclose(cont_alpha**2, ac[:990], rtol=1e-4)


def test_continuous_linear_is_the_limit_of_ddpm_linear():
    # Song et al. 2021 eq. 33: DDPM's linear betas are beta(t)/T of the VP-SDE; at T = 1000 the
    # discrete and continuous alphas_cumprod agree to O(1/T).
    ac = np.asarray(S.make("linear", 1000).alphas_cumprod)
    t = (np.arange(1000) + 1) / 1000
    alpha, sigma = S.continuous_alpha_sigma("linear", jnp.asarray(t))
    np.testing.assert_allclose(alpha**2, ac, atol=2e-3)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    ac_sl = np.asarray(S.make("scaled_linear", 1000).alphas_cumprod)
    alpha, _ = S.continuous_alpha_sigma("scaled_linear", jnp.asarray(t))
    np.testing.assert_allclose(alpha**2, ac_sl, atol=2e-3)


def test_sigmoid_schedule_endpoints_and_monotone():
    # Chen 2023 Alg. 1: gamma(0) = 1, gamma(1) = clip_min, monotone decreasing.
    t = jnp.linspace(0, 1, 101)
    alpha, _ = S.continuous_alpha_sigma("sigmoid", t)
    assert abs(float(alpha[0]) - 1) < 1e-6 and float(alpha[-1]) ** 2 < 1e-8
    assert bool(jnp.all(jnp.diff(alpha) < 0))
    ac = S.make("sigmoid", 1000).alphas_cumprod
    cont = S.continuous_alpha_sigma("sigmoid", jnp.arange(1, 1000) / 1000)[0] ** 2
    np.testing.assert_allclose(ac[:-1], cont, rtol=1e-4, atol=1e-7)
    logsnr = S.continuous_logsnr("sigmoid", jnp.asarray([0.25, 0.5, 0.75]))
    assert bool(jnp.all(jnp.diff(logsnr) < 0))


def test_flow_schedule_coefficients():
    sched = S.make("flow", 1000)
    assert sched.prediction_type == "flow"
    t = jnp.asarray([0, 249, 499, 998, 999])
    alpha, sigma = S.alpha_sigma(sched, t)
    s = (np.asarray(t) + 1) / 1000
    np.testing.assert_allclose(sigma, s, atol=1e-6)
    np.testing.assert_allclose(alpha, 1 - s, atol=1e-6)
    x0, noise = jnp.ones((5, 2)), -jnp.ones((5, 2))
    np.testing.assert_allclose(S.q_sample(sched, x0, t, noise), S.flow_interpolate(x0, noise, sigma),
                               atol=1e-6)


def test_flow_timesteps_match_flow_match_euler():
    # diffusers' FlowMatchEulerDiscreteScheduler: sigmas (i + 1) / T, timesteps = sigma * 1000.
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    _, sigma = S.alpha_sigma(S.make("flow", 1000), jnp.arange(1000)[::-1])
    np.testing.assert_allclose(sigma, ref.sigmas.numpy(), atol=1e-6)
    np.testing.assert_allclose(sigma * S.FLOW_TIME_SCALE, ref.timesteps.numpy(), atol=1e-3)


def test_flow_shift_matches_diffusers_and_open_sora_resolution_shift():
    # diffusers FlowMatchEulerDiscreteScheduler(shift=k) shifts sigmas by k s / (1 + (k - 1) s).
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = np.arange(1000, 0, -1) / 1000
    np.testing.assert_allclose(S.shift_flow_time(unshifted, 3.0), ref.sigmas.numpy(), atol=1e-6)
    assert S.shift_flow_time(0.3, 1.0) == 0.3 and S.shift_flow_time(1.0, 5.0) == 1.0
    # Open-Sora 1.2 timestep_transform: ratio = sqrt(pixels / base_pixels) * sqrt(frames / base_frames);
    # with tokens = frames x pixels / patch, that is sqrt(tokens / base_tokens).
    frames, side, base_frames, base_side = 8, 48, 1, 32
    ratio = math.sqrt(side * side / base_side**2) * math.sqrt(frames / base_frames)
    tokens, base = frames * (side // 2) ** 2, base_frames * (base_side // 2) ** 2
    assert math.isclose(S.flow_shift_for(tokens, shift_base_tokens=base), ratio)
    assert S.flow_shift_for(tokens, flow_shift=2.0) == 2.0  # no base: the same shift at every size
    np.testing.assert_allclose(S.flow_shift_for(np.array([64, 256]), flow_shift=1.5, shift_base_tokens=64), [1.5, 3.0])
    with pytest.raises(UserError, match=r"^flow_shift=0\.0: must be a finite number > 0"):
        S.flow_shift_for(4, flow_shift=0.0)
    with pytest.raises(UserError, match=r"^shift_base_tokens=-1: must be an int >= 0"):
        S.flow_shift_for(4, shift_base_tokens=-1)


def test_alpha_sigma_logsnr_identities():
    sched = S.make("scaled_linear", 1000)
    t = jnp.arange(0, 1000, 37)
    alpha, sigma = S.alpha_sigma(sched, t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(S.logsnr(sched, t), 2 * np.log(alpha / sigma), rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(jnp.diff(S.logsnr(sched, t)) < 0))


def test_q_sample_endpoints():
    sched = S.make("linear", 1000)
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(key0, (4, 3, 4, 4, 2), minval=-1, maxval=1)  # video (B, T, H, W, C)
    noise = jax.random.normal(key1, x0.shape)
    x_t = S.q_sample(sched, x0, jnp.zeros(4, jnp.int32), noise)
    # alpha_0 = sqrt(1 - 1e-4), sigma_0 = 0.01 (DDPM beta_1 = 1e-4)
    np.testing.assert_allclose(x_t, x0, atol=0.01 * float(jnp.abs(noise).max()) + 1e-4)
    np.testing.assert_array_equal(S.q_sample(sched, x0, jnp.zeros(4, jnp.int32), 0 * noise),
                                  jnp.sqrt(sched.alphas_cumprod[0]) * x0)
    # At t = T-1, x_t ~ N(0, 1) for any x0 (alpha_T ~ 0.0064).
    x0 = jnp.full((512, 8, 8, 1), 0.9)
    noise = jax.random.normal(key1, x0.shape)
    x_t = S.q_sample(sched, x0, jnp.full(512, 999), noise)
    assert abs(float(x_t.mean())) < 0.02 and abs(float(x_t.std()) - 1) < 0.015


def test_parameterisation_round_trips():
    k = jax.random.split(jax.random.key(1), 3)
    x0, eps = jax.random.normal(k[0], (3, 4, 4, 2)), jax.random.normal(k[1], (3, 4, 4, 2))
    alpha, sigma = S.alpha_sigma(S.make("cosine"), jnp.asarray([5, 500, 900]))
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    x_t = alpha * x0 + sigma * eps
    v = S.v_from_x0_eps(x0, eps, alpha, sigma)
    for pred_type, out in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        got_x0, got_eps = S.to_x0_eps(out, x_t, alpha, sigma, pred_type)
        np.testing.assert_allclose(got_x0, x0, atol=2e-4, err_msg=pred_type)
        np.testing.assert_allclose(got_eps, eps, atol=2e-4, err_msg=pred_type)
    s = jnp.asarray([0.1, 0.5, 0.9])[:, None, None, None]
    x_s = S.flow_interpolate(x0, eps, s[:, 0, 0, 0])
    got_x0, got_eps = S.to_x0_eps(eps - x0, x_s, 1 - s, s, "flow")
    np.testing.assert_allclose(got_x0, x0, atol=1e-5)
    np.testing.assert_allclose(got_eps, eps, atol=1e-5)


def _openai_space_timesteps(num_timesteps, section_counts):
    """openai/improved-diffusion respace.py `space_timesteps`, verbatim (the reference)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("counts", ["250", "25", "10,10,10", "7,3,1", "ddim50", "ddim25", 100])
def test_respace_matches_openai(counts):
    sched = S.make("linear", 1000)
    timesteps, spaced = S.respace(sched, counts)
    ref_counts = str(counts) if isinstance(counts, int) else counts
    assert timesteps.tolist() == sorted(_openai_space_timesteps(1000, ref_counts))
    np.testing.assert_allclose(spaced.alphas_cumprod, sched.alphas_cumprod[timesteps], rtol=1e-6)
    # openai SpacedDiffusion: new_betas = 1 - ac[t_i] / ac[t_{i-1}], starting from 1.
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(spaced.betas, np.float64)),
                               spaced.alphas_cumprod, rtol=1e-5)


def test_respace_ddim_equals_diffusers_leading_timesteps():
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(50)
    timesteps, _ = S.respace(S.make("linear"), "ddim50")
    assert timesteps.tolist() == sorted(ref.timesteps.tolist())


def test_consistency_scalings_match_diffusers_and_boundary():
    ref = diffusers.CMStochasticIterativeScheduler(sigma_min=0.002, sigma_data=0.5)
    sigma = np.asarray([0.002, 0.1, 1.0, 10.0, 80.0], np.float32)
    c_skip_ref, c_out_ref = ref.get_scalings_for_boundary_condition(torch.from_numpy(sigma))
    c_skip, c_out = S.consistency_scalings(jnp.asarray(sigma))
    np.testing.assert_allclose(c_skip, c_skip_ref.numpy(), rtol=1e-6)
    np.testing.assert_allclose(c_out, c_out_ref.numpy(), rtol=1e-6, atol=1e-8)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


@pytest.mark.parametrize("call, field", [
    (lambda: S.make("quadratic"), "schedule="),
    (lambda: S.make("linear", 0), "num_timesteps="),
    (lambda: S.make("linear", prediction_type="x0"), "prediction_type="),
    (lambda: S.make("flow", prediction_type="epsilon"), "prediction_type="),
    (lambda: S.respace(S.make("linear", 100), "10,x"), "section_counts="),
    (lambda: S.respace(S.make("linear", 100), "60,60"), "section_counts="),
    (lambda: S.respace(S.make("linear", 100), "ddim30"), "section_counts="),
    (lambda: S.to_x0_eps(0.0, 0.0, 1.0, 0.0, "noise"), "prediction_type="),
])
def test_bad_input_raises_user_error(call, field):
    with pytest.raises(UserError, match=field):
        call()
