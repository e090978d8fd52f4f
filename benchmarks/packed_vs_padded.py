"""Video DiT training throughput: NaViT packing vs pad-to-max vs per-shape buckets (Open-Sora).

Same machine, same run, same model, same examples and the same train step: the trainer's
`genjax.train.trainer.make_train_step` (jitted, state donated; AdamW lr 1e-4 from
`state.make_optimizer`, non-finite guard, EMA 0.9999) on a 1-device mesh, with the loss
`genjax.diffusion.losses.diffusion_loss` (eps-prediction MSE on a linear VP schedule, one
timestep per example). The data is the mixed distribution of `benchmarks/packing_padding.py`
(sides 64-256 px, aspect 1:2 to 2:1, 1-16 frames) taken as *latents* scaled down 8x for CPU
(latent sides 8-32 in steps of 4, i.e. whole 4x4 patches; 4 channels), tubelets (1, 4, 4),
seq_len = the largest example's token count. Model: the tiny factorised `VideoDiT` (D = 64,
depth 2, 4 heads). One epoch over all the examples per method:

- padded: one example per sequence (`pack(..., max_per_seq=1)`), i.e. each example padded to
  the largest; --batch sequences per step, `VideoDiT.packed` with the padding masked out of
  attention and out of the loss (`diffusion_loss(..., segment_ids=, max_per_seq=1)`).
- packed: NaViT (Dehghani et al. 2023, "Patch n' Pack"): best-fit decreasing packing
  (`pack(..., max_per_seq=16)`), --batch sequences per step, block-diagonal attention, t per
  example slot (`diffusion_loss(..., segment_ids=, max_per_seq=16)`).
- buckets: Open-Sora's bucketing (hpcaitech/Open-Sora, `opensora/datasets/bucket.py` `Bucket`
  and `sampler.py` `VariableVideoBatchSampler`: every batch holds one (resolution, frames)
  bucket, with a batch size per bucket in `bucket_config`): examples grouped by their exact
  latent shape (T, H, W) (Open-Sora first resizes / crops clips to its configured buckets;
  these latents already lie on a grid of 592 shapes), each bucket cut (in order) into batches of
  up to B examples, run through the regular form `module.apply(x (B, T, H, W, C), t (B,))` with
  `diffusion_loss` unmasked. B is --bucket-batch, or by default per bucket max(1, batch *
  seq_len // the bucket's tokens per example), so a step sees about as many tokens as a packed
  step. No padding at all, but every distinct batch shape (a bucket, and its last partial batch
  if smaller) is a compiled step of its own.

Each method's steps are compiled ahead of time (`train_step.lower(...).compile()`, counted and
timed separately: "compiled shapes, compile s") and each compiled step is run once before
timing. Every method sees all examples once, so useful (non-padding) tokens are the same;
reported: useful tokens per second (median of --repeats interleaved epochs,
`common.time_interleaved`), padding fraction of the processed sequences, steps, and the ratios
packed / padded and packed / buckets. Buckets take more, smaller optimizer steps per epoch.

    .venv/bin/python benchmarks/packed_vs_padded.py [--examples 16] [--batch 4] [--record]

~2 min on 2 quiet cores, most of it compiling (~6 s per step shape, 17 shapes; ~3x that on a busy machine).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (sets XLA threads before jax is imported in main)

TITLE = "Video DiT training: packed vs pad-to-max vs buckets"
PATCH = (1, 4, 4)
CHANNELS = 4
OPTIM = dict(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
             weight_decay=0.0, grad_clip_norm=0.0)
PACKED_KEYS = ("tokens", "segment_ids", "positions", "example_index")


def mixed_latent_shapes(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n latent (T, H, W): H, W in 8..32 step 4 (64-256 px / 8, whole 4x4 patches), 1/2 <= H/W <= 2, T in 1..16."""
    rng, sides, shapes = np.random.default_rng(seed), np.arange(8, 33, 4), []
    while len(shapes) < n:
        h, w = (int(s) for s in rng.choice(sides, 2))
        if 0.5 <= h / w <= 2:
            shapes.append((int(rng.integers(1, 17)), h, w))
    return shapes


def possible_shapes() -> list[tuple[int, int, int]]:
    """Every latent (T, H, W) `mixed_latent_shapes` can draw: the most buckets (compiled steps) it can need."""
    sides = range(8, 33, 4)
    return [(t, h, w) for t in range(1, 17) for h in sides for w in sides if 0.5 <= h / w <= 2]


def tokens_of(shape: tuple[int, ...]) -> int:
    """Tubelet tokens of a latent (T, H, W)."""
    return int(np.prod([s // p for s, p in zip(shape, PATCH)]))


def _chunks(packed: dict, batch: int) -> list[dict]:
    """Split a packed dict into batches of `batch` sequences; the last is filled with empty sequences."""
    s = packed["tokens"].shape[0]
    out = []
    for start in range(0, s, batch):
        part = {k: packed[k][start:start + batch] for k in PACKED_KEYS}
        short = batch - part["tokens"].shape[0]
        if short:
            part = {k: np.concatenate([v, np.full((short, *v.shape[1:]), -1 if k == "example_index" else 0, v.dtype)])
                    for k, v in part.items()}
        out.append(part)
    return out


def bucket_batches(videos: list[np.ndarray], bucket_batch: int, tokens_per_step: int) -> list[dict]:
    """Open-Sora-style buckets: videos grouped by exact shape (first-seen order), each bucket cut into
    batches of up to `bucket_batch` examples (0: max(1, tokens_per_step // tokens per example))."""
    buckets: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for v in videos:
        buckets[v.shape].append(v)
    out = []
    for shape, members in buckets.items():
        size = bucket_batch or max(1, tokens_per_step // tokens_of(shape[:3]))
        out += [{"video": np.stack(members[i:i + size])} for i in range(0, len(members), size)]
    return out


def make_loss_fn(module, schedule):
    """`(params, batch, rng) -> (loss, metrics)` for the trainer: a packed batch (tokens, segment_ids,
    positions, example_index (S, M)) through `VideoDiT.packed`, a {"video": (B, T, H, W, C)} batch
    through the regular form; both with `diffusion_loss`."""
    from genjax.diffusion.losses import diffusion_loss

    def loss_fn(params, batch, rng):
        variables = {"params": params}
        if "video" in batch:
            return diffusion_loss(lambda x, t: module.apply(variables, x, t), batch["video"], rng, schedule=schedule)
        seg, pos = batch["segment_ids"], batch["positions"]
        return diffusion_loss(lambda x, t: module.apply(variables, x, seg, pos, t, method="packed"), batch["tokens"],
                              rng, schedule=schedule, segment_ids=seg, max_per_seq=batch["example_index"].shape[1])

    return loss_fn


def compile_steps(train_step, holder: dict, batches: list[dict], key) -> tuple[list, dict]:
    """AOT-compile the trainer's step once per distinct batch shape (`train_step.lower(...).compile()`,
    timed) and run each new executable once (untimed warm-up). Returns (the executable of each batch,
    {"compiled_shapes", "compile_s"})."""
    import jax

    cache, exes, seconds = {}, [], 0.0
    for b in batches:
        sig = tuple((k, v.shape) for k, v in sorted(b.items()))
        if sig not in cache:
            start = time.perf_counter()
            cache[sig] = train_step.lower(holder["state"], b, key).compile()
            seconds += time.perf_counter() - start
            holder["state"], metrics = cache[sig](holder["state"], b, key)
            jax.block_until_ready(metrics["loss"])
        exes.append(cache[sig])
    return exes, {"compiled_shapes": len(cache), "compile_s": seconds}


def epoch(holder: dict, exes: list, batches: list, keys: list):
    """A zero-argument callable running one epoch of compiled train steps; the state (donated) lives
    in `holder` and is carried from epoch to epoch and method to method."""
    import jax

    def go():
        metrics = None
        for exe, batch, key in zip(exes, batches, keys):
            holder["state"], metrics = exe(holder["state"], batch, key)
        return float(jax.block_until_ready(metrics["loss"]))  # waits for the last step

    return go


def main(argv: list[str] | None = None) -> dict:
    """Time one epoch of each method (interleaved, median of --repeats); returns the result dict
    (`padded` / `packed` / `buckets` entries with steps, padding_fraction, compiled_shapes,
    compile_s, seconds, useful_tokens_per_s; `ratio` = packed / padded and `ratio_buckets` =
    packed / buckets useful tokens per second)."""
    parser = common.base_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--examples", type=int, default=16, help="(nearly every one a bucket of its own)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per train step (packed, padded)")
    parser.add_argument("--bucket-batch", type=int, default=0,
                        help="examples per bucket step (0: per bucket, ~batch * seq_len tokens per step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-impl", default="auto", help="VideoDiT attention_impl (CPU auto: dense 'xla' "
                        "up to 1k x 1k, i.e. full masked L x L for packed factorised attention)")
    args = parser.parse_args(argv)
    context = common.start(args, torch=False)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from genjax.data.packing import pack
    from genjax.diffusion import schedules
    from genjax.models.video_dit import VideoDiT
    from genjax.parallel import mesh as mesh_lib
    from genjax.train import state as state_lib
    from genjax.train import trainer

    shapes = mixed_latent_shapes(args.examples, args.seed)
    rng = np.random.default_rng(args.seed)
    videos = [rng.normal(size=(*s, CHANNELS)).astype(np.float32) for s in shapes]
    seq_len = max(map(tokens_of, shapes))
    total_tokens = sum(map(tokens_of, shapes))

    module = VideoDiT(patch_size=PATCH, in_channels=CHANNELS, hidden_size=64, depth=2, num_heads=4,
                      attention="factorised", attention_impl=args.attention_impl)
    params = jax.jit(module.init)(jax.random.key(args.seed), jnp.zeros((1, 1, 8, 8, CHANNELS)), jnp.zeros((1,)))
    params = jax.device_get(params["params"])
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx, _ = state_lib.make_optimizer(OPTIM, total_steps=1)
    state = state_lib.TrainState(
        step=np.int32(0), params=params, opt_state=tx.init(params), ema_params=jax.tree.map(np.copy, params),
        rng=jax.random.PRNGKey(0), nonfinite_count=np.int32(0), nonfinite_streak=np.int32(0))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    holder = {"state": jax.device_put(state, shardings)}
    train_step = trainer.make_train_step(make_loss_fn(module, schedules.make("linear", 1000)), tx, mesh=mesh,
                                         state_shardings=shardings, ema_decay=0.9999, ema_warmup=False)

    host = {"padded": _chunks(pack(videos, seq_len=seq_len, patch_size=PATCH, max_per_seq=1), args.batch),
            "packed": _chunks(pack(videos, seq_len=seq_len, patch_size=PATCH, max_per_seq=16), args.batch),
            "buckets": bucket_batches(videos, args.bucket_batch, args.batch * seq_len)}
    fns, stats = {}, {}
    for method, batches in host.items():
        batches = [jax.device_put(b, mesh_lib.batch_sharding(mesh)) for b in batches]
        keys = [jax.random.fold_in(jax.random.PRNGKey(1), i) for i in range(len(batches))]
        exes, st = compile_steps(train_step, holder, batches, keys[0])
        slots = sum(b["tokens"].shape[0] * seq_len for b in host[method]) if method != "buckets" else total_tokens
        stats[method] = {"steps": len(batches), "useful_tokens": total_tokens,
                         "padding_fraction": 1 - total_tokens / slots, **st}
        fns[method] = epoch(holder, exes, batches, keys)
    times = common.time_interleaved(fns, args.repeats)
    for method, st in stats.items():
        st["seconds"] = common.median(times[method])
        st["useful_tokens_per_s"] = st["useful_tokens"] / st["seconds"]
    speed = {m: st["useful_tokens_per_s"] for m, st in stats.items()}
    ratio, ratio_buckets = speed["packed"] / speed["padded"], speed["packed"] / speed["buckets"]
    result = {**stats, "ratio": ratio, "ratio_buckets": ratio_buckets, "seq_len": seq_len,
              "examples": args.examples, "times": times}
    bucket_sizes = sorted({b["video"].shape[0] for b in host["buckets"]})
    rows = [("workload", f"{args.examples} mixed latents (sides 8-32 step 4, aspect 1:2-2:1, 1-16 frames, C=4), "
                         f"tubelets {PATCH}, seq_len {seq_len}, {args.batch} sequences / step (packed, padded), "
                         f"{total_tokens} tokens in all"),
            ("model, step", f"VideoDiT factorised, D=64, depth 2, 4 heads, attention_impl {args.attention_impl}; "
                            "trainer.make_train_step: diffusion_loss (eps, linear), AdamW, EMA; one epoch per "
                            f"method, median of {args.repeats} interleaved"),
            ("buckets", f"{len({b['video'].shape[1:4] for b in host['buckets']})} distinct (T, H, W) "
                        f"(of {len(possible_shapes())} the distribution can give), "
                        f"{args.bucket_batch or 'per-bucket'} examples / step (sizes {bucket_sizes[0]}-"
                        f"{bucket_sizes[-1]})")]
    labels = {"padded": "pad-to-max (1 example / sequence)", "packed": "packed (NaViT, best-fit decreasing)",
              "buckets": "buckets (Open-Sora, exact shape)"}
    for method, label in labels.items():
        st = stats[method]
        rows.append((label, f"{st['steps']} steps, padding {st['padding_fraction']:.1%}, {st['seconds']:.2f} s, "
                            f"**{st['useful_tokens_per_s']:.0f} useful tokens/s**; {st['compiled_shapes']} compiled "
                            f"shape(s), {st['compile_s']:.1f} s compiling (not timed)"))
    rows += [("packed / padded useful tokens/s", f"{ratio:.2f}x"),
             ("packed / buckets useful tokens/s", f"{ratio_buckets:.2f}x")]
    result["cpu_times"] = times.cpu
    return common.finish("packed_vs_padded", TITLE, args, argv, context, result, rows + common.cpu_rows(times))


if __name__ == "__main__":
    main()
