"""grain input pipeline: source -> per-process shard -> shuffle -> repeat -> transforms -> batch.

`make_dataset` returns a grain `DatasetIterator` of batches: dicts of numpy arrays with a
leading batch axis (str fields become numpy str arrays). Its `get_state()` / `set_state()`
round-trip exactly, so a restored iterator yields the same batches as an uninterrupted one; the
trainer saves that state in its checkpoints.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from genjax.errors import UserError, check


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(shard_index, shard_count), None meaning this process of `jax.process_count()`."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    check(shard_count >= 1, "shard_count", shard_count, "must be >= 1")
    check(0 <= shard_index < shard_count, "shard_index", shard_index,
          f"must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from `parts` (numpy SeedSequence), for grain's shuffle / random_map."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def batches_per_epoch(num_examples: int, *, batch_size: int, shard_count: int = 1,
                      drop_remainder: bool = True) -> int:
    """Batches one process yields per epoch of `num_examples` under `make_dataset`'s sharding:
    each shard holds `num_examples // shard_count` examples, batched by `batch_size // shard_count`."""
    per_shard, local_batch = num_examples // shard_count, batch_size // shard_count
    return per_shard // local_batch if drop_remainder else -(-per_shard // local_batch)


def make_dataset(source: Sequence[dict[str, Any]], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap
                                      | Callable[[dict], dict]] = (),
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True, read_options: grain.ReadOptions | None = None,
                 skip_unreadable: bool = False) -> grain.DatasetIterator:
    """Build a checkpointable iterator of batches over a random-access `source`.

    Steps (grain `MapDataset`): `source` -> shard: process `shard_index` of `shard_count`
    (defaults `jax.process_index()` / `jax.process_count()`) takes examples `shard_index,
    shard_index + shard_count, ...` of the first `len(source) // shard_count * shard_count`, so
    every process sees the same number (the last `len(source) % shard_count` are never used)
    -> shuffle (a fresh permutation each epoch, seeded by `seed` and the shard; `shuffle=False`
    keeps source order) -> repeat `num_epochs` times (None: forever) -> `transforms` in order
    (grain `RandomMap`s get a per-example `np.random.Generator` seeded by `seed`, the shard,
    the transform's position and the example's position in the stream; `Map`s and plain
    callables `example -> example` are applied as is) -> batches of
    `batch_size // shard_count` examples (the per-process share of the global `batch_size`;
    batches may span an epoch boundary) -> `to_iter_dataset(read_options)`.

    Returns a grain `DatasetIterator` yielding dicts of numpy arrays (B, ...) with
    B = batch_size // shard_count; `get_state()` / `set_state(state)` save and restore its
    position. `read_options` sets grain's prefetch threads and buffer (grain's defaults if None).
    `skip_unreadable`: an example the source cannot read (`UserError`, e.g. a clip that does not
    decode) is skipped and named on stderr (`SkipUnreadable`) instead of stopping the run.

    Raises `UserError` if batch_size < 1 or not divisible by shard_count, the shard has fewer
    examples than one batch (with drop_remainder), num_epochs < 1, or the shard arguments are
    out of range.
    """
    check(isinstance(batch_size, (int, np.integer)) and batch_size >= 1, "batch_size", batch_size,
          "must be an integer >= 1")
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    check(batch_size % shard_count == 0, "batch_size", batch_size,
          f"must be divisible by the number of processes (shard_count={shard_count})")
    check(num_epochs is None or num_epochs >= 1, "num_epochs", num_epochs, "must be None or >= 1")
    per_shard, local_batch = len(source) // shard_count, batch_size // shard_count
    check(per_shard >= (local_batch if drop_remainder else 1), "batch_size", batch_size,
          f"each of {shard_count} shard(s) holds {per_shard} of the {len(source)} examples, "
          f"fewer than one batch of {local_batch}")

    ds = example_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, transforms=transforms,
                         shard_index=shard_index, shard_count=shard_count, skip_unreadable=skip_unreadable)
    if skip_unreadable:  # grain batches a filtered dataset only as an IterDataset
        return iter(ds.to_iter_dataset(read_options).batch(local_batch, drop_remainder=drop_remainder))
    ds = ds.batch(local_batch, drop_remainder=drop_remainder)
    return iter(ds.to_iter_dataset(read_options))


class SkipUnreadable:
    """A random-access source whose unreadable examples (`UserError` from the source, e.g. a clip
    that does not decode) read as None, each named once on stderr and counted in `skipped`
    (indices); `example_dataset(skip_unreadable=True)` filters them out."""

    def __init__(self, source: Sequence[dict[str, Any]]):
        self.source, self.skipped = source, []

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.read(index, None)

    def read(self, index: int, rng: np.random.Generator | None = None):
        """`source.read(index, rng)` (a source drawing per read) or `source[index]`, None when unreadable."""
        try:
            return self.source.read(index, rng) if rng is not None else self.source[index]
        except UserError as e:
            if index not in self.skipped:
                self.skipped.append(index)
                print(f"genjax: warning: skipping unreadable example {index} "
                      f"({len(self.skipped)} so far): {e}", file=sys.stderr)
            return None

    def __repr__(self) -> str:
        return f"SkipUnreadable({self.source!r}, skipped={len(self.skipped)})"


def example_dataset(source: Sequence[dict[str, Any]], *, seed: int = 0, shuffle: bool = True,
                    num_epochs: int | None = None, transforms: Sequence = (),
                    shard_index: int | None = None, shard_count: int | None = None,
                    skip_unreadable: bool = False) -> grain.MapDataset:
    """`make_dataset`'s steps before batching (shard, shuffle, repeat, transforms), as a grain
    `MapDataset` of single examples: the input of a packer (`genjax.data.packing.packed_batches`),
    whose examples differ in size. With `skip_unreadable` the source is wrapped in
    `SkipUnreadable` and its None examples filtered out before the transforms (iterate it as an
    IterDataset). A source with a `read(index, rng)` method (a video source drawing each clip's
    start, e.g. `folders.VideoFolderSource(clip_start="random")`) is read through it, with a
    generator seeded by `seed`, the shard and the position in the stream: a new draw every epoch,
    the same draws for the same seed. Raises `UserError` for bad shard arguments or num_epochs."""
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    check(num_epochs is None or num_epochs >= 1, "num_epochs", num_epochs, "must be None or >= 1")
    per_shard = len(source) // shard_count
    reads = hasattr(source, "read")
    wrapped = SkipUnreadable(source) if skip_unreadable else source
    ds = grain.MapDataset.range(len(source)) if reads else grain.MapDataset.source(wrapped)
    ds = ds[shard_index:per_shard * shard_count:shard_count]
    if shuffle:
        ds = ds.shuffle(seed=_seed(seed, shard_index))
    ds = ds.repeat(num_epochs)
    if reads:
        ds = ds.random_map(wrapped.read, seed=_seed(seed, shard_index, 0))
    if skip_unreadable:
        ds = ds.filter(lambda example: example is not None)
    for position, transform in enumerate(transforms):
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=_seed(seed, shard_index, position + 1))
        else:
            ds = ds.map(transform)
    return ds
