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


# ---- exact properties on Gaussian data x0 ~ N(MU, S_D^2 I): the optimal denoisers are analytic.
MU, S_D = 0.3, 0.5
LINEAR = schedules.make("linear")


def gaussian_eps(x, t):
    """E[eps | x_t] for Gaussian data under the linear VP schedule (linear in x_t)."""
    alpha, sigma = (a[:, None, None, None] for a in schedules.alpha_sigma(LINEAR, t))
    return sigma * (x - alpha * MU) / (alpha**2 * S_D**2 + sigma**2)


def gaussian_velocity(x, t):
    """E[noise - x0 | x_s] for Gaussian data on the rectified-flow path, t = 1000 s."""
    s = (t / schedules.FLOW_TIME_SCALE)[:, None, None, None]
    a = 1 - s
    var = a**2 * S_D**2 + s**2
    e_x0 = MU + a * S_D**2 * (x - a * MU) / var
    e_z = s * (x - a * MU) / var
    return e_z - e_x0


def exact_consistency_F(x_in, t):
    """Raw output F whose c_skip x + c_out F is the exact Gaussian consistency function."""
    sigma = jnp.exp(t / 250.0)[:, None, None, None]
    x = x_in * jnp.sqrt(sigma**2 + 0.25)
    f = MU + (x - MU) * jnp.sqrt(S_D**2 + 0.002**2) / jnp.sqrt(S_D**2 + sigma**2)
    c_skip, c_out = schedules.consistency_scalings(sigma)
    return (f - c_skip * x) / c_out


def test_ddim_inversion_round_trip():
    x0 = MU + S_D * jax.random.normal(jax.random.key(5), SHAPE)
    kw = dict(schedule=LINEAR, num_steps=50)
    x_T = samplers.ddim_invert(gaussian_eps, x0, fixed_point_iters=4, **kw)
    assert float(jnp.abs(x_T - x0).mean()) > 0.3  # it really moved
    np.testing.assert_allclose(samplers.sample(gaussian_eps, x_T, sampler="ddim", **kw), x0, atol=1e-3)
    # Plain inversion (diffusers' DDIMInverseScheduler) is only first-order consistent.
    plain = samplers.sample(gaussian_eps, samplers.ddim_invert(gaussian_eps, x0, **kw), sampler="ddim", **kw)
    assert 1e-3 < float(jnp.abs(plain - x0).max()) < 0.1


def test_flow_euler_converges_to_exact_transport():
    # The flow ODE of Gaussian data is linear and maps noise z to MU + S_D z exactly.
    z = jax.random.normal(jax.random.key(6), SHAPE)
    errs = [float(jnp.abs(samplers.sample(gaussian_velocity, z, schedule=schedules.make("flow"),
                                          sampler=s, num_steps=n) - (MU + S_D * z)).max())
            for s, n in (("euler", 5), ("euler", 50), ("heun", 10))]
    assert errs[1] < errs[0] / 5 and errs[1] < 0.05, errs  # first order
    assert errs[2] < min(errs[1], 0.01), errs  # second order


def test_consistency_sampler_with_exact_consistency_function():
    z = jax.random.normal(jax.random.key(8), (4096, 2, 2, 1))
    one = samplers.sample(exact_consistency_F, z, sampler="consistency", num_steps=1, rng=jax.random.key(0))
    expect = MU + (80 * z - MU) * np.sqrt(S_D**2 + 0.002**2) / np.sqrt(S_D**2 + 80**2)
    np.testing.assert_allclose(one, expect, atol=2e-4)
    multi = samplers.sample(exact_consistency_F, z, sampler="consistency", num_steps=3, rng=jax.random.key(0))
    assert abs(float(multi.mean()) - MU) < 0.03 and abs(float(multi.std()) - S_D) < 0.03


@pytest.mark.parametrize("sampler, sched", [
    ("ddpm", "linear"), ("ddim", "linear"), ("dpmpp_2m", "linear"), ("euler", "flow"),
    ("heun", "linear"), ("consistency", None)])
def test_deterministic_for_fixed_key(sampler, sched):
    sched = schedules.make(sched) if sched else None
    fn = exact_consistency_F if sampler == "consistency" else jax_denoiser
    kw = dict(schedule=sched, sampler=sampler, num_steps=4, eta=0.5 if sampler == "ddim" else 0.0)
    a = samplers.sample(fn, noise_T(), rng=jax.random.key(1), **kw)
    b = samplers.sample(fn, noise_T(), rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    if sampler in ("ddpm", "ddim", "consistency"):
        c = samplers.sample(fn, noise_T(), rng=jax.random.key(2), **kw)
        assert float(jnp.abs(a - c).max()) > 1e-3


def test_sharded_equals_unsharded_and_sample_is_jittable():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    noise = jax.random.normal(jax.random.key(4), (8, 4, 4, 3))
    kw = dict(schedule=LINEAR, sampler="ddpm", num_steps=5, rng=jax.random.key(9))
    plain = samplers.sample(jax_denoiser, noise, **kw)
    sharded = samplers.sample(jax_denoiser, jax.device_put(noise, NamedSharding(mesh, P("data"))), **kw)
    np.testing.assert_allclose(sharded, plain, atol=1e-6)
    jitted = jax.jit(lambda n, k: samplers.sample(jax_denoiser, n, schedule=LINEAR, sampler="ddpm",
                                                  num_steps=5, rng=k))(noise, kw["rng"])
    np.testing.assert_allclose(jitted, plain, atol=1e-6)


def test_known_region_is_kept_and_sdedit():
    k = jax.random.split(jax.random.key(11), 2)
    x_known = jax.random.uniform(k[0], SHAPE, minval=-1, maxval=1)
    mask = (jnp.arange(4) < 2).astype(jnp.float32)[None, :, None, None]  # top half known
    out, traj = samplers.sample(gaussian_eps, noise_T(), schedule=LINEAR, sampler="ddim", num_steps=10,
                                rng=k[1], known=(x_known, mask), return_trajectory=True)
    np.testing.assert_array_equal(out[:, :2], x_known[:, :2])
    assert traj.shape == (11,) + SHAPE and float(jnp.abs(out[:, 2:] - x_known[:, 2:]).max()) > 0.1
    # SDEdit: strength 0 is the identity; small strength stays close to the input.
    x_init = x_known
    assert samplers.sdedit(gaussian_eps, x_init, strength=0.0, schedule=LINEAR, rng=k[1]) is x_init
    edited, traj = samplers.sdedit(gaussian_eps, x_init, strength=0.3, schedule=LINEAR, rng=k[1],
                                   num_steps=10, return_trajectory=True)
    assert traj.shape[0] == 4  # int(10 * 0.3) = 3 steps
    full = samplers.sdedit(gaussian_eps, x_init, strength=1.0, schedule=LINEAR, rng=k[1], num_steps=10)
    assert float(jnp.abs(edited - x_init).mean()) < float(jnp.abs(full - x_init).mean())


@pytest.mark.parametrize("kw, field", [
    (dict(sampler="plms"), "sampler="),
    (dict(num_steps=0), "num_steps="),
    (dict(num_steps=1001), "num_steps="),
    (dict(eta=1.5), "eta="),
    (dict(sampler="ddpm", rng=None), "rng="),
    (dict(sampler="ddpm", variance_type="learned_range"), "variance_type="),
    (dict(timestep_spacing="karras"), "timestep_spacing="),
    (dict(schedule=schedules.make("flow"), sampler="ddpm"), "sampler="),
])
def test_bad_input_raises_user_error(kw, field):
    args = {**dict(schedule=LINEAR, sampler="ddim", num_steps=5, rng=jax.random.key(0)), **kw}
    with pytest.raises(UserError, match=field):
        samplers.sample(jax_denoiser, noise_T(), **args)


def test_sdedit_bad_strength():
    with pytest.raises(UserError, match="strength="):
        samplers.sdedit(jax_denoiser, noise_T(), strength=1.2, schedule=LINEAR, rng=jax.random.key(0))


@pytest.mark.parametrize("num_steps, shift", [(8, 3.0), (3, 1.0), (1, 5.0)])
def test_unipc_flow_matches_diffusers(num_steps, shift):
    """UniPC-2 (bh2, x0 form, lower-order final step) on Wan's flow grid, step by step: the
    grid, the integer model times and every corrected / predicted sample."""
    ref = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    ref_traj, ref_t = run_diffusers(ref, noise_T(), num_steps)
    grid = samplers._grid(schedules.make("flow"), "unipc", num_steps, "leading", shift, 0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(grid["t"]), ref_t.astype(np.float32))
    np.testing.assert_allclose(np.asarray(grid["sigma"]), ref.sigmas.numpy(), rtol=1e-7)
    _, traj = samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("flow"), sampler="unipc",
                              num_steps=num_steps, flow_shift=shift, return_trajectory=True)
    np.testing.assert_allclose(traj, ref_traj, atol=1e-5, rtol=1e-5)


def test_unipc_refuses_vp_schedules():
    with pytest.raises(UserError, match="unipc is implemented for flow schedules only"):
        samplers.sample(jax_denoiser, noise_T(), schedule=schedules.make("linear"), sampler="unipc", num_steps=4)
