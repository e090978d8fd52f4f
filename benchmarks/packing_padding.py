"""Padding fraction of NaViT packing: `pack`, the grain stream, first-fit and pad-to-max.

Shapes: sides 64-256 px in steps of 16, aspect ratio 1:2 to 2:1, 16x16-px patches. Three
distributions, 1,000 examples each (seed 0) unless noted:

- images:  T = 1, patch (1, 16, 16), seq_len 1024 (16-256 tokens an example);
- videos:  T in 2, 4, ..., 16, patch (2, 16, 16), seq_len 4096 (up to 2,048 tokens);
- mixed:   half images (one tubelet: T = 2, a frame repeated), half videos as above, patch
           (2, 16, 16), seq_len 4096; also 277 of them (seed 1), the size of issue 15's case;
- navit:   the earlier benchmark's mix (T in pt*{1..16/pt}) at (1, 16, 16) / 4096 and
           (2, 16, 16) / 2048, for comparison with the figures recorded before.

max_per_seq = 16 throughout. `pack` is measured through its plan (`best_fit_bins`, exactly what
`pack` does, on the token counts, nothing allocated); "first-fit" is NaViT's greedy packing in
input order (what `pack` did before; a local copy here for comparison) and "best-fit decreasing
only" is `pack`'s plan without its cardinality fallback. The grain stream (`packed_batches`)
runs for real on zero videos with C = 1 (padding does not depend on C) and counts the padding
of every emitted sequence (the end of the stream included).

    .venv/bin/python benchmarks/packing_padding.py             # ~10 s on 2 CPU cores
    .venv/bin/python benchmarks/packing_padding.py --markdown  # the table for BENCHMARKS.md
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from genjax.data.bin_packing import best_fit, decreasing
from genjax.data.packing import best_fit_bins, packed_batches

MAX_PER_SEQ = 16
SIDES = np.arange(64, 257, 16)


def _side_pair(rng) -> tuple[int, int]:
    while True:
        h, w = (int(s) for s in rng.choice(SIDES, 2))
        if 0.5 <= h / w <= 2:
            return h, w


def shapes(kind: str, n: int, pt: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n (T, H, W) shapes of distribution `kind` ("images", "videos", "mixed", "navit")."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        h, w = _side_pair(rng)
        if kind == "images" or (kind == "mixed" and rng.random() < 0.5):
            t = pt
        elif kind == "navit":
            t = pt * int(rng.integers(1, 16 // pt + 1))
        else:
            t = 2 * int(rng.integers(1, 9))
        out.append((t, h, w))
    return out


def first_fit(tokens, seq_len: int) -> int:
    """Sequences used by greedy first-fit in input order (the packer before best-fit)."""
    room: list[int] = []
    count: list[int] = []
    for n in tokens:
        s = next((s for s, (r, c) in enumerate(zip(room, count))
                  if n <= r and c < MAX_PER_SEQ), len(room))
        if s == len(room):
            room.append(seq_len)
            count.append(0)
        room[s] -= n
        count[s] += 1
    return len(room)


def bfd_only(tokens, seq_len: int) -> int:
    """Sequences used by plain best-fit decreasing (`pack`'s first plan)."""
    room: list[int] = []
    count: list[int] = []
    best_fit([tokens[i] for i in decreasing(tokens)], room, count, capacity=seq_len,
             max_items=MAX_PER_SEQ)
    return len(room)


def stream_padding(shape_list, patch_size, seq_len: int, lookahead: int) -> tuple[float, int]:
    """Padding fraction and sequence count of `packed_batches` over the whole finite stream."""
    examples = (grain.MapDataset.source(shape_list)
                .map(lambda shape: {"video": np.zeros((*shape, 1), np.float32)})
                .to_iter_dataset(grain.ReadOptions(num_threads=0)))
    padded = sequences = 0
    for batch in packed_batches(examples, seq_len=seq_len, patch_size=patch_size,
                                max_per_seq=MAX_PER_SEQ, sequences_per_batch=1,
                                lookahead=lookahead):
        padded += int(np.sum(batch["segment_ids"] == 0))
        sequences += 1
    return padded / (sequences * seq_len), sequences


CASES = [  # name, kind, examples, seed, patch_size, seq_len
    ("images", "images", 1000, 0, (1, 16, 16), 1024),
    ("videos", "videos", 1000, 0, (2, 16, 16), 4096),
    ("mixed", "mixed", 1000, 0, (2, 16, 16), 4096),
    ("mixed, 277 (issue 15 size)", "mixed", 277, 1, (2, 16, 16), 4096),
    ("navit mix", "navit", 1000, 0, (1, 16, 16), 4096),
    ("navit mix", "navit", 1000, 0, (2, 16, 16), 2048),
]
LOOKAHEADS = (32, 128)


def main(markdown: bool = False) -> None:
    head = ["distribution", "patch", "seq_len", "examples", "lower bound", "pad-to-max",
            "first-fit", "best-fit decreasing only", "`pack`",
            *(f"`packed_batches` lookahead {k}" for k in LOOKAHEADS)]
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    else:
        print(" | ".join(head))
    for name, kind, n, seed, patch_size, seq_len in CASES:
        shape_list = shapes(kind, n, patch_size[0], seed)
        tokens = [int(np.prod([s // p for s, p in zip(shape, patch_size)]))
                  for shape in shape_list]
        total = sum(tokens)

        def pad(count: int, total: int = total, seq_len: int = seq_len) -> str:
            return f"{100 * (1 - total / (count * seq_len)):.2f} % ({count})"

        lower = max(-(-total // seq_len), -(-n // MAX_PER_SEQ))
        row = [name, str(patch_size), str(seq_len), str(n), pad(lower),
               f"{100 * (1 - np.mean(tokens) / max(tokens)):.1f} %",
               pad(first_fit(tokens, seq_len)), pad(bfd_only(tokens, seq_len)),
               pad(len(best_fit_bins(tokens, seq_len=seq_len, max_per_seq=MAX_PER_SEQ)))]
        for lookahead in LOOKAHEADS:
            padding, count = stream_padding(shape_list, patch_size, seq_len, lookahead)
            row.append(f"{100 * padding:.2f} % ({count})")
        print(("| " + " | ".join(row) + " |") if markdown else " | ".join(row), flush=True)


if __name__ == "__main__":
    main(markdown="--markdown" in sys.argv[1:])
