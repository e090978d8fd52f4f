"""Train-step throughput of DiT-S/2 (batch 8, 32x32x4 latents): genjax's train step vs PyTorch.

ours: `genjax.train.trainer.make_train_step` (jitted, state donated) on a 1-device mesh: the
  eps-prediction MSE `diffusion_loss` (Ho et al. 2020, L_simple; linear betas, t ~ U{0..999}),
  `value_and_grad`, AdamW (`state.make_optimizer`: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no
  weight decay, no clipping, as DiT), the non-finite guard and the EMA (decay 0.9999, no
  warm-up, as DiT). Warmed up by one step (compile + run).
reference: diffusers `DiTTransformer2DModel` in torch eager: `DDPMScheduler.add_noise`, the same
  MSE, `backward()`, `torch.optim.AdamW` (same hyper-parameters) and an EMA update with
  `torch._foreach_mul_` / `_foreach_add_`; one warm-up step.
Both sides start from the same weights and see the same (x0, y, t, noise) at every step (t and
noise drawn from the per-step key exactly as `diffusion_loss` does), so they follow the same
trajectory: every step's loss and the norm of the parameter change must agree to --tol. (The
EMA moves by ~(1 - 0.9999) lr per step, below float32 resolution: timed, not compared.) Label dropout is
off on both sides (eval-mode torch, `train=False` apply). Reported: examples/s from the median
step time over --repeats, and the ratio (torch step time / genjax step time).

    .venv/bin/python benchmarks/train_step.py [--record]   # ~3 min on 2 busy cores
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TITLE = "DiT train step: loss, grads, AdamW, EMA (training issue)"
OPTIM = dict(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
             weight_decay=0.0, grad_clip_norm=0.0)
EMA_DECAY = 0.9999


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    common.add_dit_args(parser)
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative difference of losses and params")
    args = parser.parse_args(argv)
    context = common.start(args)

    import jax
    import numpy as np
    import optax
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from jax.sharding import NamedSharding, PartitionSpec as P

    from genjax.diffusion import losses, schedules
    from genjax.parallel import mesh as mesh_lib
    from genjax.train import state as state_lib
    from genjax.train import trainer

    torch_model, module, params = common.dit_pair(args)
    inputs = common.dit_inputs(args)
    schedule = schedules.make("linear")
    steps = 1 + args.repeats

    # ---- genjax
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx, _ = state_lib.make_optimizer(OPTIM, total_steps=steps)

    def loss_fn(params, batch, rng):
        def denoise(x_t, t, y):
            return module.apply({"params": params}, x_t, t, y)

        return losses.diffusion_loss(denoise, batch["image"], rng, schedule=schedule, cond={"y": batch["label"]})

    host_params = params
    state = state_lib.TrainState(
        step=np.int32(0), params=host_params, opt_state=tx.init(host_params),
        ema_params=jax.tree.map(np.copy, host_params), rng=jax.random.PRNGKey(0),
        nonfinite_count=np.int32(0), nonfinite_streak=np.int32(0))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    holder = {"state": jax.device_put(state, shardings)}
    train_step = trainer.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings,
                                         ema_decay=EMA_DECAY, ema_warmup=False)
    batch = jax.device_put({"image": inputs["x"], "label": inputs["y"]}, mesh_lib.batch_sharding(mesh))
    keys = [jax.random.fold_in(jax.random.PRNGKey(1), i) for i in range(steps)]

    def draws(key):  # diffusion_loss's (t, noise) for this key
        t_key, noise_key = jax.random.split(key)
        return (np.asarray(jax.random.randint(t_key, (args.batch,), 0, schedule.num_timesteps)),
                np.asarray(jax.random.normal(noise_key, inputs["x"].shape, inputs["x"].dtype)))

    # ---- torch
    torch_draws = [(torch.from_numpy(t.astype(np.int64)), common.nchw(noise)) for t, noise in map(draws, keys)]
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    weights = list(torch_model.parameters())
    initial_weights = [p.detach().clone() for p in weights]
    ema = [p.clone() for p in initial_weights]
    opt = torch.optim.AdamW(weights, lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    x0, y = common.nchw(inputs["x"]), torch.from_numpy(inputs["y"].astype(np.int64))
    loss_log: dict[str, list[float]] = {"jax": [], "torch": []}

    def run_jax():
        i = len(loss_log["jax"])
        holder["state"], metrics = train_step(holder["state"], batch, keys[i])
        loss_log["jax"].append(float(jax.block_until_ready(metrics["loss"])))

    def run_torch():
        t, noise = torch_draws[len(loss_log["torch"])]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(torch_model(ddpm.add_noise(x0, noise, t), timestep=t, class_labels=y).sample, noise)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, EMA_DECAY)
            torch._foreach_add_(ema, weights, alpha=1 - EMA_DECAY)
        loss_log["torch"].append(float(loss.detach()))

    common.time_interleaved({"jax": run_jax, "torch": run_torch}, 1)  # warm-up (jax: compile)
    times = common.time_interleaved({"jax": run_jax, "torch": run_torch}, args.repeats)

    loss_diff = common.check_agree("per-step losses", loss_log["jax"], loss_log["torch"], args.tol)
    final = holder["state"]
    change = (float(optax.global_norm(jax.tree.map(lambda a, b: a - b, holder["state"].params, host_params))),
              float(torch.stack([(a.detach() - b).norm() for a, b in zip(weights, initial_weights)]).norm()))
    change_diff = common.check_agree("norm of the parameter change", *change, args.tol)
    jax_s, torch_s = common.median(times["jax"]), common.median(times["torch"])
    result = {"jax_examples_per_s": args.batch / jax_s, "torch_examples_per_s": args.batch / torch_s,
              "jax_s": jax_s, "torch_s": torch_s, "ratio": torch_s / jax_s, "losses": loss_log,
              "loss_rel_diff": loss_diff, "change_norm_rel_diff": change_diff, "change_norms": change,
              "times": times}
    rows = [("genjax examples/s (jitted train_step)", f"{args.batch / jax_s:.2f}  ({jax_s:.3f} s/step)"),
            ("torch examples/s (eager + AdamW + EMA)", f"{args.batch / torch_s:.2f}  ({torch_s:.3f} s/step)"),
            ("ratio torch / genjax step time", f"{torch_s / jax_s:.2f}"),
            ("rel. diff losses / parameter change norm", f"{loss_diff:.1e} / {change_diff:.1e}"),
            ("steps timed (after 1 warm-up)", str(args.repeats)),
            ("sizes", common.dit_sizes(args))]
    result["cpu_times"] = times.cpu
    return common.finish("train_step", TITLE, args, argv, context, result, rows + common.cpu_rows(times))


if __name__ == "__main__":
    main()
