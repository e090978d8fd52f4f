"""Diffusion samplers, each one compiled loop (`jax.jit` around a `lax.scan` over steps).

The denoiser is any callable `denoise_fn(x_t, t, **cond) -> model_output` with x_t (B, ..., C)
channels-last (images (B, H, W, C), videos (B, T, H, W, C)) and t a (B,) array: int32 timestep
indices for VP schedules, float32 `s * 1000` for flow schedules, float32 `250 * log(sigma)` for
"consistency". The output is what `schedule.prediction_type` names, with C channels (2C for
variance_type "learned_range": [prediction, v] as improved DDPM / DiT learn_sigma).

Timesteps follow diffusers' `timestep_spacing` ("leading" as DDIMScheduler, "linspace",
"trailing"): S steps t_0 > ... > t_{S-1}, each stepping to the next one and the last to the clean
level (alphas_cumprod = 1). Flow schedules use FlowMatchEulerDiscreteScheduler's grid
s = shift(linspace(1, shift(1/T), S)) followed by s = 0, shift(u) = k u / (1 + (k - 1) u) the SD3
timestep shift (Esser et al. 2024, eq. 23; k = flow_shift, 1 = none).

Randomness: step i draws `jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 0),
x.shape, x.dtype)` for its own noise and `... fold_in(..., 1)` for known-region noise, so a fixed
rng gives the same numbers whatever the sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genjax.diffusion import schedules
from genjax.diffusion.schedules import Schedule
from genjax.errors import check

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun", "consistency", "unipc")
SPACINGS = ("leading", "linspace", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")

Denoiser = Callable[..., jax.Array]


def timesteps_for(num_timesteps: int, num_steps: int, timestep_spacing: str = "leading") -> np.ndarray:
    """(num_steps,) int64 descending timesteps, as diffusers DDIMScheduler / DDPMScheduler
    `set_timesteps` (steps_offset 0). See Lin et al. 2024, Table 2 for the three spacings."""
    check(timestep_spacing in SPACINGS, "timestep_spacing", timestep_spacing, f"must be one of {SPACINGS}")
    T, n = num_timesteps, num_steps
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1].astype(np.int64)
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> np.ndarray:
    """(num_steps,) descending EDM noise levels (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclasses.dataclass(frozen=True)
class _Opts:
    """Static options of one compiled sampling loop."""
    sampler: str
    prediction_type: str
    is_flow: bool
    eta: float
    variance_type: str
    clip_sample: float | None
    has_known: bool
    sigma_data: float = 0.5
    sigma_min: float = 0.002


def _grid(schedule: Schedule | None, sampler: str, num_steps: int, timestep_spacing: str,
          flow_shift: float, sigma_min: float, sigma_max: float) -> dict[str, jax.Array]:
    """Per-level arrays, S + 1 levels (the last is clean): alpha, sigma, and for VP
    alphas_cumprod; per-step (S,) model times t."""
    if sampler == "consistency":
        sig = np.concatenate([karras_sigmas(num_steps, sigma_min, sigma_max), [sigma_min]])
        return dict(alpha=jnp.ones(num_steps + 1), sigma=jnp.asarray(sig, jnp.float32),
                    t=jnp.asarray(250.0 * np.log(sig[:-1] + 1e-44), jnp.float32))
    T = schedule.num_timesteps
    if sampler == "unipc":  # UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps, float64 then float32
        s = np.linspace(1.0, 1.0 / T, num_steps + 1)[:-1]
        s = flow_shift * s / (1 + (flow_shift - 1) * s)
        if abs(s[0] - 1) < 1e-6:
            s[0] -= 1e-6  # diffusers: keeps log(sigma / alpha) finite at the first level
        t = (s * T).astype(np.int64)  # the model sees integer (truncated) timesteps
        s = jnp.asarray(np.concatenate([s, [0.0]]), jnp.float32)
        return dict(alpha=1.0 - s, sigma=s, t=jnp.asarray(t, jnp.float32))
    if schedule.is_flow:
        def shift(u):
            return schedules.shift_flow_time(u, flow_shift)

        s = shift(np.linspace(1.0, shift(1.0 / T), num_steps))  # diffusers shifts the end twice
        s = jnp.asarray(np.concatenate([s, [0.0]]), jnp.float32)
        return dict(alpha=1.0 - s, sigma=s, t=s[:-1] * schedules.FLOW_TIME_SCALE)
    ts = timesteps_for(T, num_steps, timestep_spacing)
    ac = jnp.concatenate([schedule.alphas_cumprod[ts], jnp.ones(1, jnp.float32)])
    return dict(alpha=jnp.sqrt(ac), sigma=jnp.sqrt(1.0 - ac), ac=ac, t=jnp.asarray(ts, jnp.int32))


def _loop(denoise_fn: Denoiser, x: jax.Array, grid: dict[str, jax.Array], rng, known, cond,
          opts: _Opts, step_offset: int = 0):
    """Run all steps of `grid` from x at level 0; returns (x_final, trajectory (S+1, ...))."""
    n_steps = grid["t"].shape[0]
    cur = {k: v[:-1] for k, v in grid.items() if k != "t"}
    nxt = {k + "_n": v[1:] for k, v in grid.items() if k != "t"}
    batch = x.shape[0]

    def model(x_in, t):
        out = denoise_fn(x_in, jnp.broadcast_to(t, (batch,)), **cond)
        if opts.variance_type == "learned_range" and opts.sampler == "ddpm":
            return out[..., : x.shape[-1]], out[..., x.shape[-1]:]
        return out, None

    def predict(x_t, t, alpha, sigma):
        """(model output, extra, x0, eps) at level (alpha, sigma)."""
        if opts.sampler == "consistency":
            c_skip, c_out = schedules.consistency_scalings(sigma, opts.sigma_data, opts.sigma_min)
            out, _ = model(x_t / jnp.sqrt(sigma**2 + opts.sigma_data**2), t)
            x0 = c_skip * x_t + c_out * out
            if opts.clip_sample is not None:
                x0 = jnp.clip(x0, -opts.clip_sample, opts.clip_sample)
            return out, None, x0, (x_t - x0) / sigma
        out, extra = model(x_t, t)
        x0, eps = schedules.to_x0_eps(out, x_t, alpha, sigma, opts.prediction_type)
        if opts.clip_sample is not None:
            x0 = jnp.clip(x0, -opts.clip_sample, opts.clip_sample)
        return out, extra, x0, eps

    def ode_coords(alpha, sigma):
        """(scale, time) of the ODE variable y = x / scale: flow: (1, s); VP: (alpha, sigma / alpha)."""
        return (1.0, sigma) if opts.is_flow else (alpha, sigma / alpha)

    def ode_slope(out, x0, eps):
        return out if opts.prediction_type == "flow" else (eps - x0 if opts.is_flow else eps)

    def unipc(x, x0, hist, per, i):
        """UniPC-2 with B(h) = expm1(-h) on x0 predictions (Zhao et al. 2023, "UniPC", Alg. 2-3;
        diffusers UniPCMultistepScheduler solver_order 2, bh2, predict_x0, lower_order_final):
        correct x_i with UniC (order of the previous predictor), then predict x_{i+1} with UniP
        (order 1 at the first and last step, else 2). Returns (x_{i+1}, new history)."""
        m, m1, m2, x_last = x0, hist["m1"], hist["m2"], hist["x"]
        alpha, sigma, sigma_p = per["alpha"], per["sigma"], per["sigma_p"]
        lam, lam_p, lam_pp, lam_n = per["lam"], per["lam_p"], per["lam_pp"], per["lam_n"]
        # UniC at level i from x_{i-1} (history), its predictor's order 1 (i == 1) or 2
        h = lam - lam_p
        b_h = jnp.expm1(-h)  # = h phi_1(-h), bh2
        base = sigma / sigma_p * x_last - alpha * b_h * m1
        phi_k0 = b_h / (-h) - 1
        b1, b2 = phi_k0 / b_h, (phi_k0 / (-h) - 0.5) * 2 / b_h
        r = (lam_pp - lam_p) / h
        rho0 = (b1 - b2) / (1 - r)
        corr2 = base - alpha * b_h * (rho0 * (m2 - m1) / r + (b1 - rho0) * (m - m1))
        corr1 = base - alpha * b_h * 0.5 * (m - m1)
        x = jnp.where(i == 0, x, jnp.where(i == 1, corr1, corr2))
        # UniP from level i to i + 1
        h = lam_n - lam
        b_h = jnp.expm1(-h)
        first = per["sigma_n"] / sigma * x - per["alpha_n"] * b_h * m
        second = first - per["alpha_n"] * b_h * 0.5 * (m1 - m) / ((lam_p - lam) / h)
        x_n = jnp.where((i == 0) | (i == n_steps - 1), first, second)
        return x_n, {"m1": m, "m2": m1, "x": x}

    def step(carry, per):
        x, x0_prev, lam_prev, hist = carry
        i = per["i"]
        key = jax.random.fold_in(rng, i + step_offset) if rng is not None else None
        z = (jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype)
             if key is not None else jnp.zeros_like(x))
        is_last = i == n_steps - 1
        alpha, sigma, alpha_n, sigma_n, t = per["alpha"], per["sigma"], per["alpha_n"], per["sigma_n"], per["t"]
        out, extra, x0, eps = predict(x, t, alpha, sigma)
        if opts.has_known and opts.sampler == "consistency":  # replace on x0, then re-noise
            x0 = known[1] * known[0] + (1 - known[1]) * x0
        lam = jnp.log(alpha) - jnp.log(sigma)
        if opts.sampler == "ddpm":  # DDPM eq. 6-7; diffusers DDPMScheduler.step
            ac, ac_n = per["ac"], per["ac_n"]
            beta_prod, beta_prod_n = 1 - ac, 1 - ac_n
            cur_alpha = ac / ac_n
            cur_beta = 1 - cur_alpha
            mean = (ac_n**0.5 * cur_beta / beta_prod) * x0 + (cur_alpha**0.5 * beta_prod_n / beta_prod) * x
            var = jnp.maximum(beta_prod_n / beta_prod * cur_beta, 1e-20)
            if opts.variance_type == "fixed_small":
                std = var**0.5
            elif opts.variance_type == "fixed_large":
                std = cur_beta**0.5
            else:  # improved DDPM eq. 15
                frac = (extra + 1) / 2
                std = jnp.exp(0.5 * (frac * jnp.log(cur_beta) + (1 - frac) * jnp.log(var)))
            x_n = mean + jnp.where(is_last, 0.0, std) * z
        elif opts.sampler == "ddim":  # DDIM eq. 12 and 16; diffusers DDIMScheduler.step
            var = sigma_n**2 * (1 - (alpha * sigma_n / (alpha_n * sigma)) ** 2)
            std = opts.eta * jnp.sqrt(jnp.maximum(var, 0.0))
            x_n = alpha_n * x0 + jnp.sqrt(jnp.maximum(sigma_n**2 - std**2, 0.0)) * eps + std * z
        elif opts.sampler == "dpmpp_2m":  # Lu et al. 2022 (DPM-Solver++), Alg. 2, midpoint form
            h = per["lam_n"] - lam
            first = sigma_n / sigma * x - alpha_n * jnp.expm1(-h) * x0
            d1 = (x0 - x0_prev) * h / (lam - lam_prev)
            second = first - 0.5 * alpha_n * jnp.expm1(-h) * d1
            x_n = jnp.where((i == 0) | is_last, first, second)
        elif opts.sampler == "unipc":
            x_n, hist = unipc(x, x0, hist, per, i)
        elif opts.sampler in ("euler", "heun"):  # Karras et al. 2022 Alg. 1 on the PF-ODE
            scale, tau = ode_coords(alpha, sigma)
            scale_n, tau_n = ode_coords(alpha_n, sigma_n)
            d = ode_slope(out, x0, eps)
            y_n = x / scale + (tau_n - tau) * d
            if opts.sampler == "heun":
                t_n = per["t_n"]
                out2, _, x0_2, eps_2 = predict(y_n * scale_n, t_n, alpha_n, sigma_n)
                y_heun = x / scale + (tau_n - tau) * 0.5 * (d + ode_slope(out2, x0_2, eps_2))
                y_n = jnp.where(is_last, y_n, y_heun)
            x_n = y_n * scale_n
        else:  # consistency: Song et al. 2023, Alg. 1
            noise_std = jnp.sqrt(jnp.maximum(sigma_n**2 - opts.sigma_min**2, 0.0))
            x_n = jnp.where(is_last, x0, x0 + noise_std * z)
        if opts.has_known and opts.sampler != "consistency":  # RePaint-style replacement
            z_known = jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype)
            x_known_n = alpha_n * known[0] + sigma_n * z_known
            x_n = known[1] * jnp.where(is_last, known[0], x_known_n) + (1 - known[1]) * x_n
        return (x_n, x0, lam, hist), x_n

    per = {**cur, **nxt, "t": grid["t"], "i": jnp.arange(n_steps)}
    lam_all = jnp.log(grid["alpha"]) - jnp.log(grid["sigma"])  # (S + 1,), +inf at a clean last level
    per["lam_n"] = lam_all[1:]
    per["t_n"] = jnp.concatenate([grid["t"][1:], grid["t"][-1:]])
    hist = {}
    if opts.sampler == "unipc":  # levels i - 1 and i - 2 (repeats of level 0 before the start: unused)
        per.update(lam=lam_all[:-1], lam_p=jnp.concatenate([lam_all[:1], lam_all[:-2]]),
                   lam_pp=jnp.concatenate([lam_all[:1], lam_all[:1], lam_all[:-3]])[:n_steps],
                   sigma_p=jnp.concatenate([grid["sigma"][:1], grid["sigma"][:-2]]))
        hist = {"m1": jnp.zeros_like(x), "m2": jnp.zeros_like(x), "x": x}
    per = {k: v if k in ("i", "t", "t_n") else v.astype(x.dtype) for k, v in per.items()}
    init = (x, jnp.zeros_like(x), jnp.zeros((), x.dtype), hist)
    (x_final, _, _, _), traj = jax.lax.scan(step, init, per)
    return x_final, jnp.concatenate([x[None], traj], axis=0)


@functools.partial(jax.jit, static_argnames=("denoise_fn", "opts", "step_offset"))
def _loop_jit(denoise_fn, x, grid, rng, known, cond, opts, step_offset):
    return _loop(denoise_fn, x, grid, rng, known, cond, opts, step_offset)


def _check(schedule, sampler, num_steps, eta, variance_type, rng, known, timestep_spacing, flow_shift=1.0):
    check(sampler in SAMPLERS, "sampler", sampler, f"must be one of {SAMPLERS}")
    check(sampler == "consistency" or isinstance(schedule, Schedule), "schedule", schedule,
          f"must be a Schedule for sampler {sampler!r}")
    limit = schedule.num_timesteps if isinstance(schedule, Schedule) else 10**9
    check(isinstance(num_steps, int) and 1 <= num_steps <= limit, "num_steps", num_steps,
          f"must be an int in [1, {limit}] (the schedule's num_timesteps)")
    check(isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0, "eta", eta, "must be in [0, 1]")
    check(isinstance(flow_shift, (int, float)) and np.isfinite(flow_shift) and flow_shift > 0, "flow_shift",
          flow_shift, "must be a finite number > 0 (1 = no shift)")
    check(variance_type in VARIANCE_TYPES, "variance_type", variance_type,
          f"must be one of {VARIANCE_TYPES}")
    check(timestep_spacing in SPACINGS, "timestep_spacing", timestep_spacing, f"must be one of {SPACINGS}")
    if sampler == "ddpm":
        check(not schedule.is_flow, "sampler", sampler, "ddpm needs a variance-preserving schedule, not 'flow'")
    if sampler == "unipc":
        check(schedule.is_flow, "sampler", sampler, "unipc is implemented for flow schedules only (diffusers' "
              "UniPCMultistepScheduler with use_flow_sigmas, as Wan 2.1 samples)")
    needs_rng = (sampler in ("ddpm", "consistency") or (sampler == "ddim" and eta > 0)
                 or known is not None)
    check(rng is not None or not needs_rng, "rng", rng,
          f"a PRNG key is required for sampler {sampler!r} with these options")


def _check_output_channels(denoise_fn, x, schedule, grid, cond, sampler, variance_type):
    if sampler == "ddpm" and variance_type == "learned_range":
        t = jnp.broadcast_to(grid["t"][0], x.shape[:1])
        out = jax.eval_shape(lambda a: denoise_fn(a, t, **cond), x)
        check(out.shape[-1] == 2 * x.shape[-1], "variance_type", variance_type,
              f"needs the denoiser to output 2C = {2 * x.shape[-1]} channels, got {out.shape[-1]}")


def sample(denoise_fn: Denoiser, noise: jax.Array, *, schedule: Schedule | None = None,
           sampler: str = "ddim", num_steps: int = 50, rng: jax.Array | None = None,
           eta: float = 0.0, variance_type: str = "fixed_small", return_trajectory: bool = False,
           known: tuple[jax.Array, jax.Array] | None = None, cond: dict[str, Any] | None = None,
           timestep_spacing: str = "leading", clip_sample: float | None = None,
           flow_shift: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
           sigma_data: float = 0.5):
    """Generate x0 from `noise` (B, ..., C) float, N(0, I), with one compiled loop of `num_steps`.

    Samplers (each checked step by step against diffusers in tests/diffusion/test_samplers.py):
      "ddpm": ancestral (Ho et al. 2020 eq. 6-7; DDPMScheduler); variance_type "fixed_small"
        (posterior variance), "fixed_large" (beta_t) or "learned_range" (Nichol & Dhariwal 2021
        eq. 15, output channels [prediction, v], v in [-1, 1]). No noise at the last step.
      "ddim": Song et al. 2021 eq. 12, eta in [0, 1] (DDIMScheduler; eta = 0 is deterministic).
      "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022; DPMSolverMultistepScheduler with
        solver_order 2, final sigma 0: first order on the first and last step).
      "euler" / "heun": Karras et al. 2022 Alg. 1 on the probability-flow ODE: in EDM coordinates
        (x / alpha, sigma / alpha) for VP schedules (EulerDiscrete / HeunDiscreteScheduler) and
        in (x, s) for flow (FlowMatchEuler / FlowMatchHeunDiscreteScheduler). Euler on any affine
        path equals DDIM with eta = 0. Heun's last step (to the clean level) is Euler.
      "unipc": UniPC-2 predictor-corrector (Zhao et al. 2023; UniPCMultistepScheduler with
        use_flow_sigmas, prediction_type flow_prediction, solver_order 2, bh2, predict_x0,
        lower_order_final, final sigma 0, Wan 2.1's scheduler), flow schedules only, on its own
        grid: s = shift(linspace(1, 1/T, S + 1)[:S]) (shifted once; the first level 1 - 1e-6) then
        0, the model seeing the integer timesteps int(1000 s).
      "consistency": multistep consistency sampling (Song et al. 2023, Alg. 1) over Karras sigmas
        from sigma_max to sigma_min (num_steps levels; the schedule is not used). The denoiser
        is called as diffusers' CM pipeline: F(x / sqrt(sigma^2 + sigma_data^2), 250 log sigma),
        and x0 = c_skip x + c_out F (`schedules.consistency_scalings`); noise is scaled by sigma_max.

    Args:
      denoise_fn: `denoise_fn(x_t, t, **cond)`; must be hashable (a function, not a fresh lambda
        per call, to reuse the compiled loop).
      noise: (B, ..., C) initial noise; may be sharded (the result keeps a compatible sharding).
      schedule: the training `Schedule` (its prediction_type says what the denoiser outputs).
      rng: PRNG key; required for ddpm, ddim with eta > 0, consistency and `known`.
      known: (x_known, mask), mask broadcastable to x, 1 = known. After every step the known
        region is replaced by x_known noised to the next level with fresh noise (RePaint, Lugmayr
        et al. 2022); the result equals x_known exactly there.
      cond: dict of extra denoiser inputs (class labels, text embeddings), passed as **cond.
      timestep_spacing: "leading" | "linspace" | "trailing" (diffusers' meanings; VP schedules).
      clip_sample: clip the predicted x0 to [-clip_sample, clip_sample] (diffusers clip_sample).
      flow_shift: SD3 timestep shift for flow schedules (1 = none).

    Returns:
      x0 with noise's shape and dtype; with return_trajectory, also (S + 1, B, ..., C): the
      initial x and every step's x_t.

    Raises:
      UserError (before compiling): unknown sampler / variance_type / timestep_spacing, num_steps
        outside [1, num_timesteps], eta outside [0, 1], ddpm on a flow schedule, a missing rng,
        learned_range with a denoiser that does not output 2C channels, flow_shift <= 0.
    """
    cond = dict(cond or {})
    _check(schedule, sampler, num_steps, eta, variance_type, rng, known, timestep_spacing, flow_shift)
    grid = _grid(schedule, sampler, num_steps, timestep_spacing, flow_shift, sigma_min, sigma_max)
    _check_output_channels(denoise_fn, noise, schedule, grid, cond, sampler, variance_type)
    x = noise * sigma_max if sampler == "consistency" else noise
    opts = _Opts(sampler, schedule.prediction_type if schedule is not None else "sample",
                 bool(schedule is not None and schedule.is_flow), float(eta), variance_type,
                 clip_sample, known is not None, sigma_data, sigma_min)
    x0, traj = _loop_jit(denoise_fn, x, grid, rng, known, cond, opts, 0)
    return (x0, traj) if return_trajectory else x0


def sdedit(denoise_fn: Denoiser, x_init: jax.Array, *, strength: float, schedule: Schedule,
           rng: jax.Array, sampler: str = "ddim", num_steps: int = 50, eta: float = 0.0,
           variance_type: str = "fixed_small", return_trajectory: bool = False,
           known: tuple[jax.Array, jax.Array] | None = None, cond: dict[str, Any] | None = None,
           timestep_spacing: str = "leading", clip_sample: float | None = None,
           flow_shift: float = 1.0):
    """SDEdit (Meng et al. 2022): noise `x_init` (B, ..., C) to the level at `strength` and denoise.

    As diffusers' img2img pipelines: of the num_steps-step grid, the last
    min(int(num_steps * strength), num_steps) steps are run, starting from q_sample(x_init) at the
    first of them (noise from `jax.random.fold_in(rng, -1)`). strength 0 returns x_init unchanged,
    strength 1 samples from (nearly) pure noise. Samplers and arguments as `sample` (not
    "consistency").

    Raises:
      UserError: strength outside [0, 1], sampler "consistency", or as `sample`.
    """
    check(isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0, "strength", strength,
          "must be in [0, 1]")
    check(sampler != "consistency", "sampler", sampler, "sdedit supports the diffusion samplers only")
    cond = dict(cond or {})
    _check(schedule, sampler, num_steps, eta, variance_type, rng, known, timestep_spacing, flow_shift)
    grid = _grid(schedule, sampler, num_steps, timestep_spacing, flow_shift, 0.0, 0.0)
    _check_output_channels(denoise_fn, x_init, schedule, grid, cond, sampler, variance_type)
    start = num_steps - min(int(num_steps * strength), num_steps)
    if start == num_steps:
        return (x_init, x_init[None]) if return_trajectory else x_init
    grid = {k: v[start:] for k, v in grid.items()}
    z = jax.random.normal(jax.random.fold_in(rng, 2**32 - 1), x_init.shape, x_init.dtype)
    x = grid["alpha"][0] * x_init + grid["sigma"][0] * z
    opts = _Opts(sampler, schedule.prediction_type, schedule.is_flow, float(eta), variance_type,
                 clip_sample, known is not None)
    x0, traj = _loop_jit(denoise_fn, x.astype(x_init.dtype), grid, rng, known, cond, opts, start)
    return (x0, traj) if return_trajectory else x0


def ddim_invert(denoise_fn: Denoiser, x0: jax.Array, *, schedule: Schedule, num_steps: int,
                cond: dict[str, Any] | None = None, return_trajectory: bool = False,
                timestep_spacing: str = "leading", fixed_point_iters: int = 0):
    """Deterministic DDIM inversion x0 -> x_T (Song et al. 2021 Sec. 4.3).

    Walks the `sample` grid backwards, from the clean level up to t_0. Each step a -> b first
    takes x_b = alpha_b x0_hat + sigma_b eps_hat with the denoiser called at the higher timestep
    t_b on the lower-level x_a (diffusers' DDIMInverseScheduler), which inverts DDIM sampling only
    to first order. `fixed_point_iters` > 0 then refines x_b by fixed-point iteration on the DDIM
    step b -> a, x_b = (alpha_b / alpha_a) (x_a - (sigma_a - alpha_a sigma_b / alpha_b) eps(x_b, t_b))
    (as in ReNoise, Garibi et al. 2024), so that sampling with sampler="ddim", eta=0 and the same
    grid returns x0 up to the iteration's residual.

    x0: (B, ..., C) float. Returns x_T (and the (S + 1, ...) trajectory, clean first).

    Raises:
      UserError: num_steps outside [1, num_timesteps], unknown timestep_spacing, fixed_point_iters < 0.
    """
    cond = dict(cond or {})
    _check(schedule, "ddim", num_steps, 0.0, "fixed_small", None, None, timestep_spacing)
    check(isinstance(fixed_point_iters, int) and fixed_point_iters >= 0, "fixed_point_iters",
          fixed_point_iters, "must be an int >= 0")
    grid = _grid(schedule, "ddim", num_steps, timestep_spacing, 1.0, 0.0, 0.0)
    x_t, traj = _invert_jit(denoise_fn, x0, grid, cond, schedule.prediction_type, fixed_point_iters)
    return (x_t, traj) if return_trajectory else x_t


@functools.partial(jax.jit, static_argnames=("denoise_fn", "prediction_type", "iters"))
def _invert_jit(denoise_fn, x0, grid, cond, prediction_type, iters):
    alpha, sigma = grid["alpha"][::-1].astype(x0.dtype), grid["sigma"][::-1].astype(x0.dtype)
    per = dict(alpha=alpha[:-1], sigma=sigma[:-1], alpha_n=alpha[1:], sigma_n=sigma[1:], t=grid["t"][::-1])

    def step(x, p):
        def model(x_in, a, s):
            out = denoise_fn(x_in, jnp.broadcast_to(p["t"], x.shape[:1]), **cond)
            return schedules.to_x0_eps(out, x_in, a, s, prediction_type)

        x0_hat, eps = model(x, p["alpha"], p["sigma"])
        x_n = p["alpha_n"] * x0_hat + p["sigma_n"] * eps
        for _ in range(iters):
            _, eps_n = model(x_n, p["alpha_n"], p["sigma_n"])
            x_n = p["alpha_n"] / p["alpha"] * (
                x - (p["sigma"] - p["alpha"] * p["sigma_n"] / p["alpha_n"]) * eps_n)
        return x_n, x_n

    x_t, traj = jax.lax.scan(step, x0, per)
    return x_t, jnp.concatenate([x0[None], traj], axis=0)
