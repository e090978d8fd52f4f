"""Video DiT training throughput: NaViT packing vs padding every example to the largest one.

Same machine, same run, same model and same compiled sequence shape `(batch, seq_len)`: the mixed
distribution of `benchmarks/packing_padding.py` (sides 64-256 px, aspect 1:2 to
2:1, 1-16 frames), taken as *latents* scaled down 8x for CPU (latent sides 8-32 in steps of 4,
i.e. whole 4x4 patches; 4 channels), tubelets (1, 4, 4), seq_len = the largest example's token
count. One epoch over the same examples per method, after a warm-up step:

- padded: one example per sequence (`pack(..., max_per_seq=1)`), i.e. each example padded to the
  largest; padding is masked out of attention and of the loss.
- packed: best-fit decreasing packing (`pack(..., max_per_seq=16)`), block-diagonal attention.

A train step is eps-prediction on a linear VP schedule with one timestep per example, AdamW,
on the tiny factorised `VideoDiT` (D = 64, depth 2, 4 heads). Reported: useful (non-padding)
tokens per second (median of --repeats interleaved epochs) and the padding fraction of the
sequences processed.

    .venv/bin/python benchmarks/packed_vs_padded.py [--examples 48] [--batch 4] [--record]   # ~3 min, 2 busy cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (sets XLA threads before jax is imported in main)

PATCH = (1, 4, 4)
CHANNELS = 4


def mixed_latent_shapes(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n latent (T, H, W): H, W in 8..32 step 4 (64-256 px / 8, whole 4x4 patches), 1/2 <= H/W <= 2, T in 1..16."""
    rng, sides, shapes = np.random.default_rng(seed), np.arange(8, 33, 4), []
    while len(shapes) < n:
        h, w = (int(s) for s in rng.choice(sides, 2))
        if 0.5 <= h / w <= 2:
            shapes.append((int(rng.integers(1, 17)), h, w))
    return shapes


def _chunks(packed: dict, batch: int) -> list[dict]:
    """Split a packed dict into batches of `batch` sequences; the last is filled with empty sequences."""
    s = packed["tokens"].shape[0]
    out = []
    for start in range(0, s, batch):
        part = {k: v[start:start + batch] for k, v in packed.items()}
        short = batch - part["tokens"].shape[0]
        if short:
            part = {k: np.concatenate([v, np.full((short, *v.shape[1:]), -1 if k == "example_index" else 0, v.dtype)])
                    for k, v in part.items()}
        out.append(part)
    return out


def make_train_step(module, optimizer, alphas_cumprod):
    """jitted `(params, opt_state, batch, rng) -> (params, opt_state, loss)` on packed batches."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, batch, rng):
        seg, x0 = batch["segment_ids"], batch["tokens"]
        s, m = batch["example_index"].shape
        t_rng, n_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, (s, m), 0, alphas_cumprod.shape[0])
        noise = jax.random.normal(n_rng, x0.shape)
        ac = alphas_cumprod[jnp.take_along_axis(t, jnp.clip(seg - 1, 0, m - 1), axis=1)][..., None]
        x_t = jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise
        out = module.apply(params, x_t, seg, batch["positions"], t, method="packed")
        valid = (seg > 0)[..., None]
        return jnp.sum(jnp.where(valid, (out - noise) ** 2, 0.0)) / (jnp.sum(valid) * x0.shape[-1])

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def epoch(step, batches: list[dict], params, opt_state):
    """A zero-argument callable running one epoch of train steps over `batches` (device arrays)."""
    import jax

    def go():
        p, o = params, opt_state
        for i, batch in enumerate(batches):
            p, o, loss = step(p, o, batch, jax.random.key(i + 1))
        return float(loss)  # waits for the last step

    return go


def main(argv: list[str] | None = None) -> dict:
    """Time one epoch of each method (interleaved, median of --repeats); returns the result dict
    (`padded` / `packed` entries with steps, padding_fraction, seconds, useful_tokens_per_s; `ratio`
    = packed / padded useful tokens per second)."""
    parser = common.base_parser(__doc__.splitlines()[0], repeats=2)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4, help="sequences per train step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    context = common.start(args, torch=False)

    import jax
    import jax.numpy as jnp
    import optax

    from genjax.data.packing import pack
    from genjax.diffusion import schedules
    from genjax.models.video_dit import VideoDiT

    shapes = mixed_latent_shapes(args.examples, args.seed)
    rng = np.random.default_rng(args.seed)
    videos = [rng.normal(size=(*s, CHANNELS)).astype(np.float32) for s in shapes]
    seq_len = max(int(np.prod([s // p for s, p in zip(shape, PATCH)])) for shape in shapes)

    module = VideoDiT(patch_size=PATCH, in_channels=CHANNELS, hidden_size=64, depth=2, num_heads=4,
                      attention="factorised")
    params = jax.jit(module.init)(jax.random.key(args.seed), jnp.zeros((1, 1, 8, 8, CHANNELS)), jnp.zeros((1,)))
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)
    step = make_train_step(module, optimizer, schedules.make("linear", 1000).alphas_cumprod)

    keys = ("tokens", "segment_ids", "positions", "example_index")
    fns, stats = {}, {}
    for method, per_seq in (("padded", 1), ("packed", 16)):
        batches = _chunks(pack(videos, seq_len=seq_len, patch_size=PATCH, max_per_seq=per_seq), args.batch)
        batches = [{k: jnp.asarray(b[k]) for k in keys} for b in batches]
        jax.block_until_ready(step(params, opt_state, batches[0], jax.random.key(0)))  # compile + warm up
        useful = sum(int(np.sum(np.asarray(b["segment_ids"]) > 0)) for b in batches)
        stats[method] = {"steps": len(batches), "useful_tokens": useful,
                         "padding_fraction": 1 - useful / (len(batches) * args.batch * seq_len)}
        fns[method] = epoch(step, batches, params, opt_state)
    times = common.time_interleaved(fns, args.repeats)
    for method, st in stats.items():
        st["seconds"] = common.median(times[method])
        st["useful_tokens_per_s"] = st["useful_tokens"] / st["seconds"]
    ratio = stats["packed"]["useful_tokens_per_s"] / stats["padded"]["useful_tokens_per_s"]
    result = {**stats, "ratio": ratio, "seq_len": seq_len, "examples": args.examples}
    rows = [("workload", f"{args.examples} mixed latents (sides 8-32 step 4, aspect 1:2-2:1, 1-16 frames, C=4), "
                         f"tubelets {PATCH}, seq_len {seq_len}, {args.batch} sequences / step"),
            ("model", "VideoDiT factorised, D=64, depth 2, 4 heads; eps loss, AdamW; one epoch per method")]
    for method, label in (("padded", "pad-to-max (1 example / sequence)"), ("packed", "packed (best-fit decreasing)")):
        st = stats[method]
        rows.append((label, f"{st['steps']} steps, padding {st['padding_fraction']:.1%}, {st['seconds']:.2f} s, "
                            f"{st['useful_tokens_per_s']:.0f} useful tokens/s"))
    rows.append(("packed / padded useful tokens/s", f"{ratio:.2f}x"))
    return common.finish("packed_vs_padded", "Video DiT training: packed vs pad-to-max", args, argv, context,
                         result, rows)


if __name__ == "__main__":
    main()
