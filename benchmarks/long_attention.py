"""Long spacetime sequences: memory and step time of the packed video-DiT gradient, dense ("xla")
against memory-linear ("blockwise") attention.

The probe model of issue 14: a packed `VideoDiT` (hidden 256, depth 2, 4 heads, patch (1, 2, 2),
4 latent channels), one sequence of L tokens holding 4 examples of L / 4 tokens each (frames of
8x8, 16x16 or 32x32 tokens), `jax.grad` of an MSE against the parameters.

- memory: XLA's `jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes` (the
  temporary buffers of the compiled gradient; nothing runs, so L = 64k is measured on a laptop),
  for joint and factorised attention, L = 1k .. 64k: dense, blockwise, and blockwise with the
  blocks under `nn.scan` and `remat="full"` (same parameters and numbers; on XLA:CPU remat only
  saves memory inside a scan, whose loop keeps the recomputation next to its use).
- time: the median wall time of the jitted gradient at L = 1k and 4k, dense and blockwise
  interleaved, after a warm-up call.

    .venv/bin/python benchmarks/long_attention.py [--lengths 1024,...] [--time-lengths 1024,4096] [--record]

With --record it rewrites its section of BENCHMARKS.md with the machine, the load before and
after, and the command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (sets XLA threads before jax is imported in main)

GIB = 2 ** 30
PROBE = dict(patch_size=(1, 2, 2), in_channels=4, hidden_size=256, depth=2, num_heads=4, max_grid=(64, 32, 32))


def probe_inputs(length: int, examples: int = 4):
    """One packed sequence of `examples` equal videos: tokens (1, L, 16), segment ids, positions, t."""
    from genjax.models.spacetime import grid_positions

    n = length // examples
    side = 8 if n <= 1024 else 16 if n <= 4096 else 32
    grid = (n // (side * side), side, side)
    assert int(np.prod(grid)) * examples == length, (length, grid)
    positions = np.concatenate([grid_positions(grid)] * examples)[None].astype(np.int32)
    segment_ids = np.repeat(np.arange(1, examples + 1, dtype=np.int32), n)[None]
    tokens = np.random.default_rng(0).normal(size=(1, length, 16)).astype(np.float32)
    return tokens, segment_ids, positions, np.full((1, examples), 500.0, np.float32)


def gradient_fn(attention: str, impl: str, **model_kw):
    """(model, jitted grad of the MSE of the packed forward against zeros); model_kw overrides PROBE."""
    import jax
    import jax.numpy as jnp

    from genjax.models.video_dit import VideoDiT

    model = VideoDiT(**{**PROBE, **model_kw}, attention=attention, attention_impl=impl)

    def loss(params, tokens, segment_ids, positions, t):
        out = model.apply(params, tokens, segment_ids, positions, t, method="packed")
        return jnp.mean(out ** 2)

    return model, jax.jit(jax.grad(loss))


def abstract_params(model, inputs):
    import jax

    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, method="packed"))


def temp_gib(attention: str, impl: str, length: int, **model_kw) -> float:
    import jax

    inputs = probe_inputs(length)
    model, grad = gradient_fn(attention, impl, **model_kw)
    params = abstract_params(model, inputs)
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    return grad.lower(params, *specs).compile().memory_analysis().temp_size_in_bytes / GIB


def step_seconds(attention: str, length: int, repeats: int) -> dict[str, float]:
    import jax

    inputs = probe_inputs(length)
    fns = {}
    for impl in ("xla", "blockwise"):
        model, grad = gradient_fn(attention, impl)
        params = jax.jit(lambda: model.init(jax.random.key(0), *inputs, method="packed"))()
        jax.block_until_ready(grad(params, *inputs))  # compile + warm-up
        fns[impl] = (grad, params)
    times = {impl: [] for impl in fns}
    for _ in range(repeats):
        for impl, (grad, params) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(grad(params, *inputs))
            times[impl].append(time.perf_counter() - t0)
    return {impl: float(np.median(ts)) for impl, ts in times.items()}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--max-dense", type=int, default=65536, help="largest L compiled with the dense path")
    parser.add_argument("--time-lengths", default="1024,4096")
    args = parser.parse_args(argv)
    context = common.start(args, torch=False)

    rows, memory, timing = [], {}, {}
    for length in (int(x) for x in args.lengths.split(",") if x):
        for attention in ("joint", "factorised"):
            gib = {impl: temp_gib(attention, impl, length) if impl != "xla" or length <= args.max_dense else None
                   for impl in ("xla", "blockwise")}
            gib["blockwise_remat"] = temp_gib(attention, "blockwise", length, scan=True, remat="full")
            memory[f"{attention} L={length}"] = gib
            dense = "not compiled" if gib["xla"] is None else f"{gib['xla']:.3f}"
            rows.append((f"temp GiB, {attention}, L={length:,}", f"xla {dense}, blockwise {gib['blockwise']:.3f}, "
                                                                 f"blockwise + scan + remat {gib['blockwise_remat']:.3f}"))
            print(*rows[-1], sep=": ", flush=True)
    for length in (int(x) for x in args.time_lengths.split(",") if x):
        for attention in ("joint", "factorised"):
            s = step_seconds(attention, length, args.repeats)
            timing[f"{attention} L={length}"] = s
            rows.append((f"grad s/step, {attention}, L={length:,}",
                         f"xla {s['xla']:.3f}, blockwise {s['blockwise']:.3f} (blockwise / xla {s['blockwise'] / s['xla']:.2f})"))
            print(*rows[-1], sep=": ", flush=True)
    return common.finish("long_attention", "Long sequences: dense vs memory-linear attention (issue 14)", args, argv,
                         context, {"memory": memory, "timing": timing}, rows)


if __name__ == "__main__":
    main()
