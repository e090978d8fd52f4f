"""First-step compile time of a DiT-XL/2 train step, unrolled blocks vs scan-over-layers.

The step is genjax's `trainer.make_train_step` (value_and_grad of the Improved-DDPM hybrid loss
`diffusion_loss(learn_sigma=True)` with label dropout, AdamW, EMA, non-finite guard) on a
1-device mesh, for `dit.Model(variant="XL/2", scan=False)` (28 unrolled blocks) and
`scan=True` (one `nn.scan`-ned block). Nothing is materialised: the state is
`state.abstract_train_state` (`jax.eval_shape` -> `jax.ShapeDtypeStruct`s) and the batch and key
are `ShapeDtypeStruct`s; we time `train_step.lower(...)` (tracing + lowering to StableHLO) and
`.compile()` (XLA:CPU), with JAX's persistent compilation cache off and a fresh `jax.jit` per
compile. A small warm-up compile goes first so one-time start-up costs are not charged to either.
Both models must have the same number of parameters. Reported: seconds per variant (median over
--repeats, alternating) and unrolled / scan.

    .venv/bin/python benchmarks/compile_time.py [--record]   # a few minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/compile_time.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TITLE = "Train-step compile time, scan over layers (training issue)"
OPTIM = dict(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
             weight_decay=0.0, grad_clip_norm=0.0)


def _overrides(args) -> dict[str, int]:
    """The model sizes given on the command line (they override the variant's)."""
    return {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")
            if getattr(args, k) is not None}


def compile_train_step(args, scan: bool, **model_kw) -> dict[str, float]:
    """Lower and compile one train step on abstract inputs; returns seconds and the param count."""
    import jax
    import numpy as np

    from genjax.diffusion import losses, schedules
    from genjax.models import dit
    from genjax.parallel import mesh as mesh_lib
    from genjax.train import state as state_lib
    from genjax.train import trainer

    module = dit.Model(variant=model_kw.pop("variant", args.variant), in_channels=args.channels,
                       learn_sigma=True, scan=scan, **{**_overrides(args), **model_kw})
    schedule = schedules.make("linear")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx, _ = state_lib.make_optimizer(OPTIM, total_steps=1)
    image = jax.ShapeDtypeStruct((args.batch, args.size, args.size, args.channels), np.float32,
                                 sharding=mesh_lib.batch_sharding(mesh))
    label = jax.ShapeDtypeStruct((args.batch,), np.int32, sharding=mesh_lib.batch_sharding(mesh))

    def init_params(key):
        return module.init(key, np.zeros((1, args.size, args.size, args.channels), np.float32),
                           np.zeros((1,), np.int32), np.zeros((1,), np.int32))["params"]

    def loss_fn(params, batch, rng):
        model_rng, loss_rng = jax.random.split(rng)

        def denoise(x_t, t, y):
            return module.apply({"params": params}, x_t, t, y, train=True, rngs={"dropout": model_rng})

        return losses.diffusion_loss(denoise, batch["image"], loss_rng, schedule=schedule,
                                     cond={"y": batch["label"]}, learn_sigma=True)

    state, shardings = state_lib.abstract_train_state(init_params, tx, seed=0, mesh=mesh)
    train_step = trainer.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings,
                                         ema_decay=0.9999, ema_warmup=False)
    rng = jax.ShapeDtypeStruct((2,), np.uint32)
    start = time.perf_counter()
    lowered = train_step.lower(state, {"image": image, "label": label}, rng)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start,
            "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))}


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--variant", default="XL/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side H = W")
    parser.add_argument("--channels", type=int, default=4)
    for flag in ("depth", "hidden-size", "num-heads", "patch-size"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="override the variant's value")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="compile a 1-block model first")
    args = parser.parse_args(argv)
    context = common.start(args, torch=False)

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    if args.warmup:
        compile_train_step(args, scan=False, variant=None, depth=1, hidden_size=32, num_heads=2,
                           patch_size=args.size // 4 or 1)
    runs: dict[str, list[dict[str, float]]] = {"unrolled": [], "scan": []}
    common.time_interleaved({name: (lambda name=name: runs[name].append(
        compile_train_step(args, scan=name == "scan"))) for name in runs}, args.repeats)
    if runs["unrolled"][0]["params"] != runs["scan"][0]["params"]:
        raise AssertionError(f"parameter counts differ: {runs['unrolled'][0]['params']} (unrolled) vs "
                             f"{runs['scan'][0]['params']} (scan)")
    med = {name: {k: common.median([r[k] for r in rs]) for k in ("lower_s", "compile_s", "total_s")}
           for name, rs in runs.items()}
    overrides = _overrides(args)
    ratio = med["unrolled"]["total_s"] / med["scan"]["total_s"]
    result = {"unrolled": med["unrolled"], "scan": med["scan"], "ratio": ratio,
              "params": runs["scan"][0]["params"], "runs": runs}
    rows = [(f"{name} s (lower + compile)",
             f"{m['total_s']:.1f}  ({m['lower_s']:.1f} + {m['compile_s']:.1f})") for name, m in med.items()]
    rows += [("ratio unrolled / scan", f"{ratio:.2f}"),
             ("parameters", f"{runs['scan'][0]['params'] / 1e6:.1f} M (both)"),
             ("repeats", str(args.repeats)),
             ("sizes", f"DiT-{args.variant} {overrides or ''}, learn_sigma, batch {args.batch}, "
                       f"{args.size}x{args.size}x{args.channels} latents, float32")]
    return common.finish("compile_time", TITLE, args, argv, context, result, rows)


if __name__ == "__main__":
    main()
