"""Samplers step by step against diffusers' schedulers, plus exact properties on Gaussian toys."""

import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.diffusion import samplers, schedules
from genjax.errors import UserError

SHAPE = (2, 4, 4, 3)
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def toy_out(xp, x, t, learned=False):
    """A fixed nonlinear 'model' of (x_t, t), identical in numpy/torch/jax (channels last)."""
    out = 0.5 * xp.tanh(x) + 1e-3 * t
    if learned:
        out = xp.concatenate([out, xp.tanh(0.7 * x)], -1) if xp is jnp else torch.cat([out, torch.tanh(0.7 * x)], -1)
    return out


def jax_denoiser(x, t):
    return toy_out(jnp, x, t.astype(jnp.float32)[:, None, None, None])


def jax_denoiser_learned(x, t):
    return toy_out(jnp, x, t.astype(jnp.float32)[:, None, None, None], learned=True)


def our_noise(rng, i):
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 0), SHAPE))


def run_diffusers(sched, x_T, num_steps, learned=False, step_kw=None, noise_fn=None):
    """Diffusers loop on NCHW tensors (the model sees NHWC); returns the NHWC trajectory."""
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(x_T)).permute(0, 3, 1, 2)
    traj = [x]
    for i, t in enumerate(sched.timesteps):
        out = toy_out(torch, x.permute(0, 2, 3, 1), t.float(), learned).permute(0, 3, 1, 2)
        kw = dict(step_kw or {})
        if noise_fn is not None:
            kw["variance_noise"] = torch.from_numpy(noise_fn(i)).permute(0, 3, 1, 2)
        x = sched.step(out, t, x, **kw).prev_sample
        traj.append(x)
    return np.stack([a.permute(0, 2, 3, 1).numpy() for a in traj]), sched.timesteps.numpy()


def noise_T():
    return jax.random.normal(jax.random.key(42), SHAPE)


@pytest.mark.parametrize("name, pred, var", [
    ("linear", "epsilon", "fixed_small"), ("scaled_linear", "v_prediction", "fixed_small"),
    ("cosine", "sample", "fixed_large"), ("linear", "epsilon", "learned_range"),
])
def test_ddpm_matches_diffusers(name, pred, var, monkeypatch):
    rng = jax.random.key(7)
    kw = dict(beta_start=0.00085, beta_end=0.012) if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_NAME[name], prediction_type=pred,
                                  variance_type=var, clip_sample=False, **kw)
    calls = iter(range(100))
    monkeypatch.setattr(ddpm_module, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(our_noise(rng, next(calls))).permute(0, 3, 1, 2))
    learned = var == "learned_range"
    ref_traj, _ = run_diffusers(ref, noise_T(), 10, learned=learned)
    sched = schedules.make(name, prediction_type=pred)
    _, traj = samplers.sample(jax_denoiser_learned if learned else jax_denoiser, noise_T(),
                              schedule=sched, sampler="ddpm", num_steps=10, rng=rng,
                              variance_type=var, return_trajectory=True)
    np.testing.assert_allclose(traj, ref_traj, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pred, eta", [("epsilon", 0.0), ("v_prediction", 0.0), ("epsilon", 0.7),
                                       ("sample", 1.0)])
def test_ddim_matches_diffusers(pred, eta, spacing):
    rng = jax.random.key(3)
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=pred, clip_sample=False, timestep_spacing=spacing)
    ref_traj, _ = run_diffusers(ref, noise_T(), 20, step_kw=dict(eta=eta),
                                noise_fn=(lambda i: our_noise(rng, i)) if eta > 0 else None)
    _, traj = samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("scaled_linear", prediction_type=pred),
                              sampler="ddim", num_steps=20, rng=rng, eta=eta,
                              timestep_spacing=spacing, return_trajectory=True)
    np.testing.assert_allclose(traj, ref_traj, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pred, steps", [("epsilon", 10), ("v_prediction", 20)])
def test_dpmpp_2m_matches_diffusers(pred, steps):
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=pred,
        solver_order=2, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    ref_traj, _ = run_diffusers(ref, noise_T(), steps)
    _, traj = samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("scaled_linear", prediction_type=pred),
                              sampler="dpmpp_2m", num_steps=steps, timestep_spacing="trailing",
                              return_trajectory=True)
    np.testing.assert_allclose(traj, ref_traj, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler, shift", [("euler", 1.0), ("euler", 3.0), ("heun", 1.0)])
def test_flow_ode_matches_diffusers(sampler, shift):
    cls = (diffusers.FlowMatchEulerDiscreteScheduler if sampler == "euler"
           else diffusers.FlowMatchHeunDiscreteScheduler)
    ref = cls(num_train_timesteps=1000, shift=shift)
    ref_traj, _ = run_diffusers(ref, noise_T(), 8)
    if sampler == "heun":  # diffusers records both Heun stages; keep the completed steps
        ref_traj = np.concatenate([ref_traj[:1], ref_traj[2::2], ref_traj[-1:]])
    _, traj = samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("flow"), sampler=sampler,
                              num_steps=8, flow_shift=shift, return_trajectory=True)
    np.testing.assert_allclose(traj, ref_traj, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_vp_ode_matches_diffusers(sampler):
    cls = diffusers.EulerDiscreteScheduler if sampler == "euler" else diffusers.HeunDiscreteScheduler
    ref = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading")
    ref.set_timesteps(10)
    x = torch.from_numpy(np.asarray(noise_T())) * ref.init_noise_sigma
    traj = [x / ref.init_noise_sigma]
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        out = toy_out(torch, x_in, t.float())
        x = ref.step(out, t, x).prev_sample
        if sampler == "euler" or ref.state_in_first_order:  # a completed (Heun: 2-stage) step
            sigma = ref.sigmas[ref.step_index]  # back to VP coordinates x / sqrt(sigma^2 + 1)
            traj.append(x / (sigma**2 + 1) ** 0.5)
    if sampler == "heun":  # diffusers' Heun takes a single Euler stage to sigma = 0
        traj.append(x)
    ref_traj = np.stack([a.numpy() for a in traj])
    _, ours = samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("scaled_linear"),
                              sampler=sampler, num_steps=10, return_trajectory=True)
    np.testing.assert_allclose(ours, ref_traj, atol=1e-5, rtol=1e-5)
