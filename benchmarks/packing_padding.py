"""Padding fraction of NaViT packing vs padding every example to the largest one.

Distribution (NaViT-style mix): side lengths 64-256 px in steps of 16, aspect ratio 1:2 to 2:1,
1-16 frames (a multiple of pt for tubelets of pt frames). Token counts come from the shapes
only, so nothing is allocated for `pack`'s plan (`first_fit_bins`, exactly what `pack` does);
the grain stream (`packed_batches`, flushes all bins when an example fits in none) runs on
zero videos with C = 1 (padding does not depend on C).

    .venv/bin/python benchmarks/packing_padding.py     # ~25 s on 2 CPU cores
"""

from __future__ import annotations

import grain
import numpy as np

from genjax.data.packing import first_fit_bins, packed_batches

MAX_PER_SEQ = 16


def mixed_shapes(n: int, pt: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """n (T, H, W) shapes: H, W in 64..256 step 16 with 1/2 <= H/W <= 2, T in pt*{1..16/pt}."""
    rng, sides, shapes = np.random.default_rng(seed), np.arange(64, 257, 16), []
    while len(shapes) < n:
        h, w = (int(s) for s in rng.choice(sides, 2))
        if 0.5 <= h / w <= 2:
            shapes.append((pt * int(rng.integers(1, 16 // pt + 1)), h, w))
    return shapes


def stream_padding(shapes, patch_size, seq_len: int, num_packing_bins: int) -> tuple[float, int]:
    """Padding fraction and sequence count of `packed_batches` over the whole finite stream."""
    examples = (grain.MapDataset.source(shapes)
                .map(lambda shape: {"video": np.zeros((*shape, 1), np.float32)})
                .to_iter_dataset(grain.ReadOptions(num_threads=0)))
    padded = sequences = 0
    for batch in packed_batches(examples, seq_len=seq_len, patch_size=patch_size,
                                max_per_seq=MAX_PER_SEQ, sequences_per_batch=1,
                                num_packing_bins=num_packing_bins):
        padded += int(np.sum(batch["segment_ids"] == 0))
        sequences += 1
    return padded / (sequences * seq_len), sequences


def main() -> None:
    print(f"{'patch':>10} {'seq_len':>7} {'examples':>8} {'method':>28} {'padding':>8} "
          f"{'sequences':>9}")
    for patch_size, seq_len in (((1, 16, 16), 4096), ((2, 16, 16), 2048)):
        for n in (300, 1000):
            shapes = mixed_shapes(n, patch_size[0])
            tokens = np.array([int(np.prod([s // p for s, p in zip(shape, patch_size)]))
                               for shape in shapes])
            rows = [("pad-to-max (each to largest)", 1 - tokens.mean() / tokens.max(), n)]
            bins = first_fit_bins(tokens, seq_len=seq_len, max_per_seq=MAX_PER_SEQ)
            rows.append(("pack: first-fit, all bins", 1 - tokens.sum() / (len(bins) * seq_len),
                         len(bins)))
            if n == 1000:
                for num_bins in (8, 32, 64):
                    padding, count = stream_padding(shapes, patch_size, seq_len, num_bins)
                    rows.append((f"packed_batches: {num_bins} bins", padding, count))
            for method, padding, count in rows:
                print(f"{str(patch_size):>10} {seq_len:>7} {n:>8} {method:>28} "
                      f"{100 * padding:>7.2f}% {count:>9}")


if __name__ == "__main__":
    main()
