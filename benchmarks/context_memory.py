"""Per-device memory of a packed video DiT's gradient under sequence (context) parallelism.

The gradient (wrt the parameters) of an eps-style loss of a packed `VideoDiT` (hidden 256, depth
2, 4 heads, tubelets (1, 2, 2), 4 latent channels, joint attention, attention_impl="blockwise")
on ONE sequence of --seq-len tokens holding 4 examples (each `T x 32 x 32` latents), compiled for
a mesh of c = 1, 2, 4, 8 of the 8 forced host devices, all on the `context` axis (data = fsdp =
tensor = 1), with ring and with Ulysses attention (`genjax.parallel.context`; with c = 1 both
are the plain program). Nothing runs: the figures are XLA's `compile().memory_analysis()` of the
per-device SPMD program (temporaries, arguments = parameters + this device's tokens, outputs =
the gradient), the memory the step would need on each device. Ulysses needs the 4 heads
divisible by c, so c = 8 is n/a for it.

    .venv/bin/python benchmarks/context_memory.py [--seq-len 8192] [--contexts 1,2,4,8]   # ~3 min, 2 busy cores

Prints a markdown table; BENCHMARKS.md is edited by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICES = 8
EXAMPLES = 4
PATCH = (1, 2, 2)
CHANNELS = 4
SIDE = 32  # latent side: (32 / 2)^2 = 256 tokens per frame


def _force_host_devices(n: int) -> None:
    """Ask XLA:CPU for n devices (must run before jax is imported; a no-op after, e.g. under pytest)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f}"


def measure(seq_len: int, contexts: list[int], strategies: list[str], hidden: int = 256, depth: int = 2,
            heads: int = 4) -> list[dict]:
    """One record per (strategy, c): bytes of temp / argument / output / alias per device and the
    compile seconds, or `error` (the UserError's line) where the configuration is not possible."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from genjax.data import packing
    from genjax.errors import UserError
    from genjax.models.video_dit import VideoDiT
    from genjax.parallel import context
    from genjax.parallel import mesh as mesh_lib
    from genjax.parallel.axes import RULES

    per_example = seq_len // EXAMPLES
    frame_tokens = (SIDE // PATCH[1]) * (SIDE // PATCH[2])
    if seq_len % EXAMPLES or per_example % frame_tokens and per_example > frame_tokens:
        raise SystemExit(f"--seq-len {seq_len}: must be 4 x a multiple of {frame_tokens} tokens (or 4 x a square)")
    if per_example >= frame_tokens:
        shape = (per_example // frame_tokens, SIDE, SIDE, CHANNELS)
    else:  # small smoke sizes: one frame of side 2 * sqrt(per_example)
        side = 2 * int(round(per_example ** 0.5))
        shape = (1, side, side, CHANNELS)
    batch = packing.pack([np.zeros(shape, np.float32)] * EXAMPLES, seq_len=seq_len, patch_size=PATCH,
                         max_per_seq=EXAMPLES)
    assert batch["tokens"].shape[:2] == (1, seq_len) and np.all(batch["segment_ids"] > 0), batch["tokens"].shape
    module = VideoDiT(patch_size=PATCH, in_channels=CHANNELS, hidden_size=hidden, depth=depth, num_heads=heads,
                      attention="joint", attention_impl="blockwise", num_classes=0)
    params = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, CHANNELS)),
                                     jnp.zeros((1,))))

    def loss_grad(params, tokens, segment_ids, positions, t, target):
        def loss(params):
            out = module.apply(params, tokens, segment_ids, positions, t, method="packed")
            valid = (segment_ids > 0)[..., None]
            return jnp.sum(jnp.where(valid, (out - target) ** 2, 0.0)) / (jnp.sum(valid) * out.shape[-1])
        return jax.grad(loss)(params)

    records = []
    for c in contexts:
        for name in (strategies[:1] if c == 1 else strategies):
            mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "context": c, "tensor": 1}, jax.devices()[:c])
            split, whole = NamedSharding(mesh, P(None, "context")), NamedSharding(mesh, P())
            spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
            args = (jax.tree.map(lambda x: spec(x, whole), params),
                    spec(batch["tokens"], split), spec(batch["segment_ids"], split), spec(batch["positions"], split),
                    jax.ShapeDtypeStruct((1, EXAMPLES), jnp.float32, sharding=whole), spec(batch["tokens"], split))
            record = {"strategy": "none" if c == 1 else name, "context": c}
            start = time.perf_counter()
            try:
                with jax.set_mesh(mesh), nn.logical_axis_rules(RULES), context.strategy(name):
                    compiled = jax.jit(loss_grad).lower(*args).compile()
            except UserError as e:
                record["error"] = str(e)
            else:
                m = compiled.memory_analysis()
                record.update(temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes,
                              output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                              compile_s=time.perf_counter() - start)
            records.append(record)
            print(record, flush=True)
    return records


def table(records: list[dict]) -> str:
    """The records as a markdown table (MiB per device)."""
    lines = ["| context c | attention | temp MiB | arguments MiB | outputs MiB | total MiB | total vs c = 1 "
             "| compile s |", "|---|---|---|---|---|---|---|---|"]
    base = next((r for r in records if r["context"] == 1 and "temp" in r), None)
    for r in records:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['strategy']} | n/a: {r['error']} | | | | | |")
            continue
        total = r["temp"] + r["argument"] + r["output"] - r["alias"]
        ratio = "" if base is None else \
            f"{total / (base['temp'] + base['argument'] + base['output'] - base['alias']):.2f}x"
        lines.append(f"| {r['context']} | {r['strategy']} | {_mib(r['temp'])} | {_mib(r['argument'])} | "
                     f"{_mib(r['output'])} | {_mib(total)} | {ratio} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the table; returns {"records": [...], "table": str, "seq_len": int}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens of the one packed sequence")
    parser.add_argument("--contexts", default="1,2,4,8", help="comma-separated context sizes (each <= 8)")
    parser.add_argument("--strategies", default="ring,ulysses")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    args = parser.parse_args(argv)
    _force_host_devices(DEVICES)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    records = measure(args.seq_len, contexts, [s for s in args.strategies.split(",") if s], args.hidden_size,
                      args.depth, args.num_heads)
    text = table(records)
    print(f"\nPacked VideoDiT gradient, hidden {args.hidden_size}, depth {args.depth}, {args.num_heads} heads, "
          f"patch {PATCH}, joint blockwise attention, 1 sequence of {args.seq_len} tokens "
          f"({EXAMPLES} examples); per-device memory from XLA's memory_analysis (total = temp + arguments + "
          f"outputs - aliased)\n")
    print(text)
    return {"records": records, "table": text, "seq_len": args.seq_len}


if __name__ == "__main__":
    main()
