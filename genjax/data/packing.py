"""NaViT patch n' pack: examples of any resolution, aspect and duration -> fixed-length sequences.

Source: Dehghani et al. 2023, "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio
and Resolution" (sec. 2.2 packing, sec. 3.4 continuous token dropping). NaViT packs greedily;
here sequences are planned best-fit decreasing (Johnson 1973; Krell et al. 2021, "Efficient
sequence packing without cross-contamination"), see `best_fit_bins`.

An example is a video `(T, H, W, C)` (an image is `T = 1`, or `(H, W, C)` in `packed_batches`)
whose `T, H, W` are divisible by `patch_size = (pt, ph, pw)`. `patchify_video` cuts it into
`n = nt*nh*nw` patches of `P = pt*ph*pw*C` values; the packers place whole examples, one after
another, into sequences of `seq_len` tokens. A packed batch is a dict of numpy arrays
(S sequences, L = seq_len, M = max_per_seq):

- `tokens (S, L, P)` float32: patch values, zero at padding.
- `segment_ids (S, L)` int32: 0 = padding, 1..k numbers the examples of a sequence in order.
- `positions (S, L, 3)` int32: the token's (t, h, w) patch coordinates within its example
  (0 at padding); dropped tokens leave gaps, kept tokens keep their coordinates.
- `example_index (S, M)` int32: which input example sits in segment j+1 of sequence s
  (its position in the input list / stream), -1 for an empty slot.
- `example_shape (S, M, 3)` int32: the example's patch grid (nt, nh, nw); 0 for an empty slot.
- `video_shape (S, M, 4)` int32: the example's (T, H, W, C); 0 for an empty slot.

`pack` packs a list; `packed_batches` packs a grain stream (checkpointable); `unpack` and
`kept_masks` invert both.
"""

from __future__ import annotations

from typing import Any, Sequence

import einops
import grain
import numpy as np

from genjax.data.bin_packing import LookaheadPack, plan_bins
from genjax.errors import check

PER_EXAMPLE_KEYS = ("example_index", "example_shape", "video_shape")


# ---------------------------------------------------------------------------------------------
# Patchify.


def _check_patch_size(patch_size) -> tuple[int, int, int]:
    ok = (isinstance(patch_size, (tuple, list)) and len(patch_size) == 3
          and all(isinstance(p, (int, np.integer)) and p >= 1 for p in patch_size))
    check(ok, "patch_size", patch_size, "must be a (pt, ph, pw) tuple of positive ints")
    return tuple(int(p) for p in patch_size)


def _grid(shape: tuple[int, ...], patch_size: tuple[int, int, int], field: str):
    """Patch grid (nt, nh, nw) of a `(T, H, W, C)` shape; UserError naming `field` otherwise."""
    check(len(shape) == 4 and all(s >= 1 for s in shape), field, tuple(shape),
          "must be a non-empty (T, H, W, C) video")
    check(all(s % p == 0 for s, p in zip(shape[:3], patch_size)), field, tuple(shape),
          f"T, H, W must be divisible by patch_size={patch_size}")
    return tuple(s // p for s, p in zip(shape[:3], patch_size))


def patchify_video(video: np.ndarray, patch_size: tuple[int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cut a video into tubelet patches: `(T, H, W, C)` -> tokens `(n, P)`, positions `(n, 3)`.

    `n = nt*nh*nw` with `(nt, nh, nw) = (T/pt, H/ph, W/pw)`; tokens are in (t, h, w) row-major
    order and the values within a patch in `(pt, ph, pw, C)` order, `P = pt*ph*pw*C` (the same
    order as `genjax.models.layers.patchify`, which is DiT's with time added). Tokens keep the
    video's dtype; positions are int32 (t, h, w) patch coordinates.

    Raises `UserError` if the video is not 4-D or T, H, W are not divisible by `patch_size`.
    """
    pt, ph, pw = patch_size = _check_patch_size(patch_size)
    grid = _grid(np.shape(video), patch_size, "video shape")
    tokens = einops.rearrange(np.asarray(video), "(t p) (h q) (w r) c -> (t h w) (p q r c)",
                              p=pt, q=ph, r=pw)
    positions = np.indices(grid, dtype=np.int32).reshape(3, -1).T
    return tokens, positions


def unpatchify_video(tokens: np.ndarray, grid: tuple[int, int, int],
                     patch_size: tuple[int, int, int]) -> np.ndarray:
    """Inverse of `patchify_video`: tokens `(nt*nh*nw, P)` -> video `(nt*pt, nh*ph, nw*pw, C)`.

    Raises `UserError` if the token count is not `prod(grid)` or `P` is not a multiple of
    `pt*ph*pw`.
    """
    pt, ph, pw = _check_patch_size(patch_size)
    nt, nh, nw = grid
    check(np.ndim(tokens) == 2 and tokens.shape[0] == nt * nh * nw
          and tokens.shape[1] % (pt * ph * pw) == 0, "tokens shape", np.shape(tokens),
          f"must be (prod(grid), pt*ph*pw*C) for grid={tuple(grid)}, patch_size={patch_size}")
    return einops.rearrange(tokens, "(t h w) (p q r c) -> (t p) (h q) (w r) c",
                            t=nt, h=nh, w=nw, p=pt, q=ph, r=pw)


# ---------------------------------------------------------------------------------------------
# Token dropping (NaViT sec. 3.4).


def _check_drop_rate(drop_rate) -> None:
    if isinstance(drop_rate, (tuple, list)):
        ok = (len(drop_rate) == 3 and drop_rate[0] == "beta"
              and all(isinstance(x, (int, float)) and x > 0 for x in drop_rate[1:]))
        check(ok, "drop_rate", drop_rate, "a distribution must be ('beta', a, b) with a, b > 0")
    else:
        check(isinstance(drop_rate, (int, float)) and 0.0 <= drop_rate < 1.0, "drop_rate",
              drop_rate, "must be a float in [0, 1) or ('beta', a, b)")


def _drops(drop_rate) -> bool:
    return isinstance(drop_rate, (tuple, list)) or drop_rate > 0


def _drop_tokens(tokens: np.ndarray, positions: np.ndarray, drop_rate,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keep `max(1, round((1 - rate) * n))` of the n tokens, a uniform random subset in order.

    `rate` is `drop_rate`, or drawn from Beta(a, b) for `("beta", a, b)`; draws from `rng`:
    the rate (beta only), then one `rng.choice(n, keep, replace=False)`.
    """
    rate = rng.beta(drop_rate[1], drop_rate[2]) if isinstance(drop_rate, (tuple, list)) \
        else drop_rate
    n = len(tokens)
    keep = max(1, int(round((1.0 - rate) * n)))
    kept = np.sort(rng.choice(n, keep, replace=False))
    return tokens[kept], positions[kept]


# ---------------------------------------------------------------------------------------------
# One example -> its packable record.


def _example_record(video: np.ndarray, index: int, field: str, *, patch_size, seq_len: int,
                    drop_rate, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Patchify (and token-drop) one example into the arrays that get packed.

    Per-token: tokens (n, P) float32, positions (n, 3); per-example (leading axis 1):
    example_index, example_shape, video_shape. UserError naming `field` if it is not 4-D, not
    divisible by patch_size, or has more than seq_len tokens after dropping.
    """
    video = np.asarray(video)
    grid = _grid(video.shape, patch_size, field)
    tokens, positions = patchify_video(video, patch_size)
    if _drops(drop_rate):
        tokens, positions = _drop_tokens(tokens, positions, drop_rate, rng)
    check(len(tokens) <= seq_len, field, video.shape,
          f"has {len(tokens)} tokens with patch_size={patch_size} (after dropping), "
          f"more than seq_len={seq_len}")
    return {
        "tokens": tokens.astype(np.float32),
        "positions": positions,
        "example_index": np.array([index], np.int32),
        "example_shape": np.array([grid], np.int32),
        "video_shape": np.array([video.shape], np.int32),
    }


def _check_sizes(seq_len, max_per_seq) -> None:
    check(isinstance(seq_len, (int, np.integer)) and seq_len >= 1, "seq_len", seq_len,
          "must be an integer >= 1")
    check(isinstance(max_per_seq, (int, np.integer)) and max_per_seq >= 1, "max_per_seq",
          max_per_seq, "must be an integer >= 1")


# ---------------------------------------------------------------------------------------------
# Packing a list.


def best_fit_bins(num_tokens: Sequence[int], *, seq_len: int, max_per_seq: int
                  ) -> list[list[int]]:
    """Plan sequences best-fit decreasing: examples largest first, each into the fullest that fits.

    Sequence s has room for example i if its tokens so far plus `num_tokens[i]` are at most
    `seq_len` and it holds fewer than `max_per_seq` examples; of those, the one with the least
    room left takes it (ties: the earliest opened); if none has, a new sequence opens. Examples
    go by decreasing token count, ties in input order. Because `max_per_seq` caps a sequence,
    best-fit decreasing can strand many small examples in sequences of `max_per_seq`; when it
    needs more sequences than the lower bound, fewer are tried by worst fit
    (`bin_packing.plan_bins`). Returns, per sequence, the input indices of its examples in the
    order they were placed (largest first). Deterministic: the plan depends on the token
    counts only, so `pack` with the same inputs and rng state gives the same result.

    Best-fit decreasing is the standard offline bin-packing heuristic (Johnson 1973, "Near-
    optimal bin packing algorithms"; for sequence packing: Krell et al. 2021, "Efficient
    sequence packing without cross-contamination"); NaViT (sec. 2.2) packs greedily in input
    order. On 1,000 mixed images and videos of up to 2,048 tokens in 4,096-token sequences
    (`benchmarks/packing_padding.py`, BENCHMARKS.md) first-fit pads 4.72 %, best-fit decreasing
    alone 23.98 % (the cap), this plan 0.75 % (the lower bound).

    Raises `UserError` if seq_len or max_per_seq < 1, or an example has more than seq_len tokens.
    """
    _check_sizes(seq_len, max_per_seq)
    for i, n in enumerate(num_tokens):
        check(n <= seq_len, f"num_tokens[{i}]", n, f"must be <= seq_len={seq_len}")
    return plan_bins([int(n) for n in num_tokens], capacity=seq_len, max_items=max_per_seq)


def _sequence(records: Sequence[dict[str, np.ndarray]], *, seq_len: int, max_per_seq: int,
              num_values: int, fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """One packed sequence (the module docstring's layout without the S axis) from records.

    `fields` are extra per-example entries (leading axis 1), -1 at empty slots in their dtype.
    """
    out = {
        "tokens": np.zeros((seq_len, num_values), np.float32),
        "segment_ids": np.zeros((seq_len,), np.int32),
        "positions": np.zeros((seq_len, 3), np.int32),
        "example_index": np.full((max_per_seq,), -1, np.int32),
        "example_shape": np.zeros((max_per_seq, 3), np.int32),
        "video_shape": np.zeros((max_per_seq, 4), np.int32),
    }
    for name in fields:
        value = records[0][name]
        out[name] = np.full((max_per_seq, *value.shape[1:]), -1, value.dtype)
    start = 0
    for j, r in enumerate(records):
        end = start + len(r["tokens"])
        out["tokens"][start:end] = r["tokens"]
        out["positions"][start:end] = r["positions"]
        out["segment_ids"][start:end] = j + 1
        for key in (*PER_EXAMPLE_KEYS, *fields):
            out[key][j] = r[key][0]
        start = end
    return out


def pack(videos: Sequence[np.ndarray], *, seq_len: int, patch_size: tuple[int, int, int],
         max_per_seq: int, drop_rate: float | tuple = 0.0,
         rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Pack a list of videos `(T, H, W, C)` (images: T = 1) into `S` sequences of `seq_len` tokens.

    Each video is patchified (`patchify_video`), optionally token-dropped, and placed whole by
    `best_fit_bins` (best-fit decreasing, at most `max_per_seq` per sequence); S is the number
    of sequences that needs. `example_index` says which input example sits in each segment, so
    `unpack` returns the examples in input order. Returns the packed dict described in the module
    docstring (`tokens (S, L, P)` float32 with P = pt*ph*pw*C, `segment_ids`, `positions`,
    `example_index`, `example_shape`, `video_shape`); `unpack` inverts it exactly when nothing
    was dropped (float32 values; uint8 inputs come back as equal float32 values).

    Token dropping (NaViT sec. 3.4): `drop_rate` is a constant rate in [0, 1) or `("beta", a, b)`
    for a per-example rate drawn from Beta(a, b); example i keeps `max(1, round((1 - rate) * n))`
    of its n tokens, a uniform random subset kept in (t, h, w) order at their original positions
    (`kept_masks` says which). Draws come from `rng` (required when dropping), example by
    example in input order, so the same generator state gives the same result. An example is
    dropped first and must then fit: more than `seq_len` remaining tokens is an error (no
    automatic extra dropping).

    Raises `UserError` (before any packing) if seq_len or max_per_seq < 1, patch_size or
    drop_rate are malformed, rng is missing while dropping, the list is empty, a video is not
    4-D or not divisible by patch_size, the videos' channel counts differ, or an example has more
    than seq_len tokens (naming `videos[i]` and its shape).
    """
    _check_sizes(seq_len, max_per_seq)
    patch_size = _check_patch_size(patch_size)
    _check_drop_rate(drop_rate)
    check(not _drops(drop_rate) or isinstance(rng, np.random.Generator), "rng", rng,
          "must be a numpy Generator when drop_rate is not 0")
    check(len(videos) >= 1, "videos", len(videos), "must hold at least one example")
    channels = np.shape(videos[0])[-1]
    for i, video in enumerate(videos):
        grid = _grid(np.shape(video), patch_size, f"videos[{i}] shape")
        check(np.shape(video)[-1] == channels, f"videos[{i}] shape", np.shape(video),
              f"must have C={channels} channels like videos[0]")
        check(_drops(drop_rate) or int(np.prod(grid)) <= seq_len, f"videos[{i}] shape",
              np.shape(video), f"has {int(np.prod(grid))} tokens with patch_size={patch_size}, "
              f"more than seq_len={seq_len}")
    records = [_example_record(v, i, f"videos[{i}] shape", patch_size=patch_size,
                               seq_len=seq_len, drop_rate=drop_rate, rng=rng)
               for i, v in enumerate(videos)]
    bins = best_fit_bins([len(r["tokens"]) for r in records], seq_len=seq_len,
                         max_per_seq=max_per_seq)
    out: dict[str, np.ndarray] = {}
    for s, members in enumerate(bins):
        sequence = _sequence([records[i] for i in members], seq_len=seq_len,
                             max_per_seq=max_per_seq, num_values=records[0]["tokens"].shape[1])
        for k, value in sequence.items():
            out.setdefault(k, np.empty((len(bins), *value.shape), value.dtype))[s] = value
    return out


# ---------------------------------------------------------------------------------------------
# Unpacking.


def _segments(packed: dict[str, np.ndarray]):
    """Yield (example_index, tokens, positions, grid, video_shape) per filled slot, by index."""
    slots = [(int(packed["example_index"][s, j]), s, j)
             for s, j in zip(*np.nonzero(packed["example_index"] >= 0))]
    for index, s, j in sorted(slots):
        here = packed["segment_ids"][s] == j + 1
        yield (index, packed["tokens"][s][here], packed["positions"][s][here],
               tuple(int(g) for g in packed["example_shape"][s, j]),
               tuple(int(v) for v in packed["video_shape"][s, j]))


def kept_masks(packed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per example (in `example_index` order): bool `(nt, nh, nw)`, True where a patch was kept.

    All True without token dropping. Works on `pack` output and `packed_batches` batches.
    """
    masks = []
    for _, _, positions, grid, _ in _segments(packed):
        mask = np.zeros(grid, bool)
        mask[tuple(positions.T)] = True
        masks.append(mask)
    return masks


def unpack(packed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Invert `pack`: the packed dict -> the list of float32 videos `(T, H, W, C)`.

    Examples come back sorted by `example_index` (the input order for `pack`), each scattered
    from its segment by its (t, h, w) positions and unpatchified; patches removed by token
    dropping are zeros (see `kept_masks`). Bit-exact for float32 inputs packed without dropping.
    Also accepts a `packed_batches` batch (examples of that batch only).
    """
    videos = []
    for _, tokens, positions, grid, video_shape in _segments(packed):
        full = np.zeros((int(np.prod(grid)), tokens.shape[1]), np.float32)
        full[np.ravel_multi_index(tuple(positions.T), grid)] = tokens
        patch = tuple(v // g for v, g in zip(video_shape[:3], grid))
        videos.append(unpatchify_video(full, grid, patch))
    return videos


# ---------------------------------------------------------------------------------------------
# Streaming: grain.


def packed_batches(examples: grain.IterDataset, *, seq_len: int,
                   patch_size: tuple[int, int, int], max_per_seq: int,
                   sequences_per_batch: int, lookahead: int = 128, num_packing_bins: int = 16,
                   key: str = "video", example_fields: Sequence[str] = (),
                   drop_rate: float | tuple = 0.0, seed: int = 0) -> grain.IterDataset:
    """Pack a grain stream of example dicts into fixed-shape batches of `sequences_per_batch`.

    `examples` yields dicts whose `key` entry is a video `(T, H, W, C)` or an image `(H, W, C)`
    (taken as T = 1), any dtype. Steps: `map_with_index` (the stream position becomes
    `example_index`) -> patchify (+ token drop as a grain `random_map` seeded by `seed`: per
    example rate and kept subset as in `pack`) -> look-ahead packer (`bin_packing.LookaheadPack`):
    it reads `lookahead` examples at a time and plans them, together with the examples of the
    sequences it kept open, as `pack` does (`best_fit_bins`); the `num_packing_bins` emptiest
    sequences that are not full (`seq_len` tokens or `max_per_seq` examples) stay open, their
    examples planned again with the next `lookahead`; the others are topped up with the largest
    examples of the open ones that still fit and emitted in plan order; the end of the stream
    emits all -> `batch(sequences_per_batch, drop_remainder=True)`.

    Each batch is the packed dict of the module docstring with S = sequences_per_batch, plus
    `example_fields` (per-example entries of the input dicts, e.g. "label", as
    `(S, max_per_seq, ...)` arrays in their own dtype, -1 at empty slots). Memory: up to
    `lookahead` examples plus `num_packing_bins` open sequences. Stream order is kept only up to
    that window (an example waits at most `bin_packing.MAX_ROUNDS_OPEN` windows). Padding of
    1,000-example streams with the defaults and max_per_seq 16 (`benchmarks/packing_padding.py`,
    BENCHMARKS.md): images 2.63 %, videos 2.72 %, mixed 0.75 % (`pack`: 0.87, 1.17, 0.75 %;
    the first-fit grain stream before: 3-7 %).

    Deterministic and checkpointable: the iterator's `get_state()` holds the parent's state at
    the start of the earliest look-ahead window with an example not yet emitted, and the
    stream indices of the examples of each held sequence, so `set_state` re-reads the stream
    from there and rebuilds the held sequences exactly (given a deterministic, checkpointable
    `examples`, and the same `lookahead`).

    Raises `UserError` at once for bad sizes / patch_size / drop_rate / sequences_per_batch /
    lookahead / num_packing_bins (integers >= 1), and while iterating for an example that is
    not divisible by patch_size, lacks `key`, or has more than seq_len tokens (naming its
    stream index), and at `set_state` for a state saved with another `lookahead`.
    """
    _check_sizes(seq_len, max_per_seq)
    patch_size = _check_patch_size(patch_size)
    _check_drop_rate(drop_rate)
    for name, value in (("sequences_per_batch", sequences_per_batch), ("lookahead", lookahead),
                        ("num_packing_bins", num_packing_bins)):
        check(isinstance(value, (int, np.integer)) and value >= 1, name, value,
              "must be an integer >= 1")

    def to_record(index: int, example: dict[str, Any], rng: np.random.Generator | None):
        field = f"example {index}"
        check(key in example, field, sorted(example), f"has no {key!r} entry")
        video = np.asarray(example[key])
        record = _example_record(video[None] if video.ndim == 3 else video, index,
                                 f"{field} shape", patch_size=patch_size, seq_len=seq_len,
                                 drop_rate=drop_rate, rng=rng)
        return {**record, **{name: np.asarray(example[name])[None] for name in example_fields}}

    ds = examples.map_with_index(lambda index, example: (index, example))
    if _drops(drop_rate):
        ds = ds.random_map(lambda pair, rng: to_record(*pair, rng), seed=seed)
    else:
        ds = ds.map(lambda pair: to_record(*pair, None))
    fields = tuple(example_fields)
    ds = LookaheadPack(
        ds, capacity=seq_len, max_items=max_per_seq, lookahead=int(lookahead),
        open_bins=int(num_packing_bins), size=lambda record: len(record["tokens"]),
        index_of=lambda record: int(record["example_index"][0]),
        build=lambda records: _sequence(records, seq_len=seq_len, max_per_seq=max_per_seq,
                                        num_values=records[0]["tokens"].shape[1],
                                        fields=fields))
    return ds.batch(sequences_per_batch, drop_remainder=True)


__all__ = ["PER_EXAMPLE_KEYS", "best_fit_bins", "kept_masks", "pack",
           "packed_batches", "patchify_video", "unpack", "unpatchify_video"]
