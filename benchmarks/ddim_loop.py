"""50-step DDIM sampling with DiT-S/2: genjax's one compiled loop vs diffusers in torch eager.

ours: `samplers.sample(denoise, noise, sampler="ddim", num_steps=50)` under one `jax.jit`,
  compiled ahead of time (`.lower().compile()`, not timed); the whole loop is one executable
  call (a `lax.scan`), and the denoiser is traced once, whatever the number of steps.
reference: diffusers `DDIMScheduler` (linear betas, clip_sample False, same timestep_spacing,
  eta 0) stepping `DiTTransformer2DModel` in eager mode under `torch.no_grad()`, one warm-up
  forward before timing.
Same weights (`load_diffusers`), same noise and class labels (class-conditional, no guidance,
learn_sigma False); the final samples must agree to --tol relative to their max |x|.
Reported: wall seconds per sampling step (loop time / num_steps), median over --repeats, and
torch / jax.

    .venv/bin/python benchmarks/ddim_loop.py [--record]   # ~10 min on 2 busy cores
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/ddim_loop.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TITLE = "DDIM sampling loop, DiT (diffusion issue)"


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=1)
    common.add_dit_args(parser)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--timestep-spacing", default="leading", choices=("leading", "linspace", "trailing"))
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative difference of the samples")
    args = parser.parse_args(argv)
    context = common.start(args)

    import jax
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    from genjax.diffusion import samplers, schedules

    torch_model, module, params = common.dit_pair(args)
    inputs = common.dit_inputs(args)
    noise, labels = inputs["x"], inputs["y"]
    schedule = schedules.make("linear")  # DiT's betas, = DDIMScheduler's default
    traces = []

    def denoise(x_t, t, y, params):
        traces.append(1)  # runs at trace time only
        return module.apply({"params": params}, x_t, t, y)

    @jax.jit
    def sample_jax(params, noise, y):
        return samplers.sample(denoise, noise, schedule=schedule, sampler="ddim", num_steps=args.num_steps,
                               cond={"y": y, "params": params}, timestep_spacing=args.timestep_spacing)

    compiled = sample_jax.lower(params, noise, labels).compile()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              timestep_spacing=args.timestep_spacing)
    x_torch, y_torch = common.nchw(noise), torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():  # warm-up: one eager forward
        torch_model(x_torch, timestep=torch.zeros(args.batch, dtype=torch.int64), class_labels=y_torch)

    out: dict[str, np.ndarray] = {}

    def run_jax():
        out["jax"] = np.asarray(compiled(params, noise, labels).block_until_ready())

    def run_torch():
        scheduler.set_timesteps(args.num_steps)
        x = x_torch
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = torch_model(x, timestep=t.expand(args.batch), class_labels=y_torch).sample
                x = scheduler.step(eps, t, x).prev_sample
        out["torch"] = x.permute(0, 2, 3, 1).numpy()

    times = common.time_interleaved({"jax": run_jax, "torch": run_torch}, args.repeats)
    diff = common.check_agree("final samples", out["jax"], out["torch"], args.tol)
    jax_step = common.median(times["jax"]) / args.num_steps
    torch_step = common.median(times["torch"]) / args.num_steps
    result = {"jax_s_per_step": jax_step, "torch_s_per_step": torch_step, "ratio": torch_step / jax_step,
              "max_rel_diff": diff, "executables": 1, "denoiser_traces": len(traces),
              "times": times, "num_steps": args.num_steps}
    rows = [("genjax s/step (one jitted scan)", f"{jax_step:.4f}"),
            ("torch s/step (eager, no_grad)", f"{torch_step:.4f}"),
            ("ratio torch / genjax", f"{torch_step / jax_step:.2f}"),
            ("compiled executables / denoiser traces", f"1 / {len(traces)}"),
            ("max rel. diff of final samples", f"{diff:.1e}"),
            ("steps x repeats", f"{args.num_steps} x {args.repeats}"),
            ("sizes", common.dit_sizes(args))]
    result["cpu_times"] = times.cpu
    return common.finish("ddim_loop", TITLE, args, argv, context, result, rows + common.cpu_rows(times))


if __name__ == "__main__":
    main()
