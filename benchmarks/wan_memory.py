"""Memory of Wan2.1-T2V-1.3B sampling at 480x832, 33 frames, from shapes (no weights, nothing runs).

    python benchmarks/wan_memory.py [--frames 33 --height 480 --width 832]

Prints (1) parameter bytes of the transformer, umT5-XXL encoder and VAE (counts from
`jax.eval_shape` of the genjax modules: no arrays are allocated) and (2) XLA's own memory
analysis of the compiled (never executed) programs on this machine's backend: one CFG
transformer call (batch 2, bf16, scanned layers), the umT5 encoder on 2 x 512 tokens (bf16), and
the chunked VAE decode (float32). The figures are the compiler's temp / argument / output bytes;
a GPU backend (cuDNN flash attention) can differ from the CPU figures recorded in BENCHMARKS.md.
"""

import argparse
import math

import jax
import jax.numpy as jnp


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _mem(fn, *args):
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    if m is None:
        return "n/a"
    gib = 2 ** 30
    return (f"temp {m.temp_size_in_bytes / gib:.2f} GiB, args {m.argument_size_in_bytes / gib:.2f} GiB, "
            f"out {m.output_size_in_bytes / gib:.3f} GiB")


def main():
    from genjax.models import t5, wan, wan_vae

    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--skip-compile", action="store_true")
    a = p.parse_args()
    t, h, w = 1 + (a.frames - 1) // 4, a.height // 8, a.width // 8
    bf16 = jnp.bfloat16
    dit = wan.Model(variant="T2V-1.3B", dtype=bf16, param_dtype=bf16, scan=True)
    enc = t5.Model(variant="umt5-xxl", dtype=bf16, param_dtype=bf16, scan=True)
    vae = wan_vae.Model(variant="wan2.1")
    x = jax.ShapeDtypeStruct((2, t, h, w, 16), jnp.float32)
    ts = jax.ShapeDtypeStruct((2,), jnp.float32)
    text = jax.ShapeDtypeStruct((2, 512, 4096), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, 512), jnp.bool_)
    z = jax.ShapeDtypeStruct((1, t, h, w, 16), jnp.float32)
    small = jax.ShapeDtypeStruct((1, 1, 16, 16, 16), jnp.float32)
    p_dit = jax.eval_shape(lambda a, b, c: dit.init(jax.random.key(0), a, b, c)["params"], small,
                           jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 512, 4096), jnp.float32))
    p_enc = jax.eval_shape(lambda i, m: enc.init(jax.random.key(0), i, m)["params"], ids, mask)
    p_vae = jax.eval_shape(lambda a: vae.init(jax.random.key(0), a)["params"],
                           jax.ShapeDtypeStruct((1, 5, 16, 16, 3), jnp.float32))
    def unbox(tree):
        return jax.tree.map(lambda s: getattr(s, "value", s), tree, is_leaf=lambda s: hasattr(s, "value"))

    p_dit, p_enc, p_vae = unbox(p_dit), unbox(p_enc), unbox(p_vae)
    for name, tree, bytes_per in (("transformer T2V-1.3B", p_dit, 2), ("umT5-XXL encoder", p_enc, 2),
                                  ("VAE", p_vae, 4)):
        n = _count(tree)
        print(f"{name}: {n:,} params, {n * bytes_per / 2**30:.2f} GiB in {'bf16' if bytes_per == 2 else 'fp32'}")
    tokens = t * (h // 2) * (w // 2)
    print(f"{a.frames} frames {a.height}x{a.width}: latents ({t}, {h}, {w}, 16), {tokens:,} transformer tokens")
    if a.skip_compile:
        return
    print("XLA", jax.default_backend(), "transformer CFG call (B=2):",
          _mem(lambda p, x, ts, c: dit.apply({"params": p}, x, ts, c), p_dit, x, ts, text))
    print("XLA", jax.default_backend(), "umT5 encoder (2 x 512 tokens):",
          _mem(lambda p, i, m: enc.apply({"params": p}, i, m), p_enc, ids, mask))
    print("XLA", jax.default_backend(), "VAE decode_chunked (1 video):",
          _mem(lambda p, z: wan_vae.decode_chunked(vae, p, z), p_vae, z))


if __name__ == "__main__":
    main()
