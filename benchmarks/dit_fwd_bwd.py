"""Forward + backward of DiT-S/2 (batch 8, 32x32x4 latents, float32): genjax vs diffusers in torch.

ours: `jax.jit(jax.value_and_grad(loss))`, loss = mean((DiT(x, t, y) - target)^2), warmed up by
  one call (compile + run).
reference: `DiTTransformer2DModel` forward, `F.mse_loss`, `loss.backward()` in torch eager, grads
  reset (`zero_grad(set_to_none=True)`) before each call; one warm-up call. The model is in eval
  mode, so neither side drops labels (the only stochastic layer).
Same weights (`load_diffusers`) and inputs; the losses and the global gradient norms must agree
to --tol. Reported: median seconds per forward + backward over --repeats, and torch / jax.

    .venv/bin/python benchmarks/dit_fwd_bwd.py [--record]   # ~2 min on 2 busy cores
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/dit_fwd_bwd.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TITLE = "DiT forward + backward (image-model issue)"


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    common.add_dit_args(parser)
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative difference of loss and grad norm")
    args = parser.parse_args(argv)
    context = common.start(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import torch.nn.functional as F

    torch_model, module, params = common.dit_pair(args)
    inputs = common.dit_inputs(args)

    def loss_fn(params, x, t, y, target):
        return jnp.mean((module.apply({"params": params}, x, t, y) - target) ** 2)

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    jax_args = (params, inputs["x"], inputs["t"], inputs["y"], inputs["target"])
    torch_args = (common.nchw(inputs["x"]), torch.from_numpy(inputs["t"]),
                  torch.from_numpy(inputs["y"].astype(np.int64)), common.nchw(inputs["target"]))
    out: dict[str, tuple[float, float]] = {}

    def run_jax():
        loss, grads = jax.block_until_ready(grad_step(*jax_args))
        out["jax"] = (float(loss), float(optax.global_norm(grads)))

    def run_torch():
        x, t, y, target = torch_args
        torch_model.zero_grad(set_to_none=True)
        loss = F.mse_loss(torch_model(x, timestep=t, class_labels=y).sample, target)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in torch_model.parameters()]))
        out["torch"] = (float(loss.detach()), float(norm))

    common.time_interleaved({"jax": run_jax, "torch": run_torch}, 1)  # warm-up (jax: compile)
    times = common.time_interleaved({"jax": run_jax, "torch": run_torch}, args.repeats)
    loss_diff = common.check_agree("loss", out["jax"][0], out["torch"][0], args.tol)
    norm_diff = common.check_agree("grad global norm", out["jax"][1], out["torch"][1], args.tol)
    jax_s, torch_s = common.median(times["jax"]), common.median(times["torch"])
    result = {"jax_s": jax_s, "torch_s": torch_s, "ratio": torch_s / jax_s, "loss": out["jax"][0],
              "grad_norm": (out["jax"][1], out["torch"][1]),
              "loss_rel_diff": loss_diff, "grad_norm_rel_diff": norm_diff, "times": times}
    rows = [("genjax s (jit value_and_grad)", f"{jax_s:.3f}"),
            ("torch s (eager forward + backward)", f"{torch_s:.3f}"),
            ("ratio torch / genjax", f"{torch_s / jax_s:.2f}"),
            ("rel. diff loss / grad norm", f"{loss_diff:.1e} / {norm_diff:.1e}"),
            ("repeats", str(args.repeats)),
            ("sizes", common.dit_sizes(args))]
    result["cpu_times"] = times.cpu
    return common.finish("dit_fwd_bwd", TITLE, args, argv, context, result, rows + common.cpu_rows(times))


if __name__ == "__main__":
    main()
