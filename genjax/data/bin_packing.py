"""Best-fit decreasing bin packing, offline (a list) and streaming (a grain look-ahead packer).

The planners behind `genjax.data.packing`: items of integer size go into bins of `capacity`
holding at most `max_items` items each. Best-fit decreasing is the standard bin-packing
heuristic (Johnson 1973, "Near-optimal bin packing algorithms"; used for sequence packing by
Krell et al. 2021, "Efficient sequence packing without cross-contamination"): items largest
first, each into the fullest bin that still fits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from genjax.errors import check

MAX_ROUNDS_OPEN = 8  # a streamed record is emitted at the latest this many rounds after it was read


def best_fit(sizes: Sequence[int], room: list[int], count: list[int], *, capacity: int,
             max_items: int, worst: bool = False, new_bins: bool = True) -> list[int] | None:
    """Place the items in the given order, each into the bin with the least room that fits it.

    A bin fits an item if its `room` is at least the item's size and its `count` is below
    `max_items`; ties go to the earliest bin; an item that fits in none opens a new bin of
    `capacity` (appended to `room` and `count`, which are updated in place), or with
    `new_bins=False` makes the call return None. `worst=True` takes the bin with the most room
    instead (worst fit). Returns each item's bin. Pass the items largest first (`decreasing`)
    for best-fit decreasing. Sizes must be at most `capacity` (callers check them).
    """
    r = np.array([*room, *[capacity] * (len(sizes) if new_bins else 0)], np.int64)
    c = np.array([*count, *[0] * (len(sizes) if new_bins else 0)], np.int64)
    used, placed = len(room), []
    for n in sizes:
        fits = np.flatnonzero((r[:used] >= n) & (c[:used] < max_items))
        if len(fits):
            best = int(fits[np.argmax(r[fits]) if worst else np.argmin(r[fits])])  # first of ties
        elif new_bins:
            best, used = used, used + 1
        else:
            return None
        r[best] -= n
        c[best] += 1
        placed.append(best)
    room[:] = r[:used].tolist()
    count[:] = c[:used].tolist()
    return placed


def decreasing(sizes: Sequence[int]) -> list[int]:
    """Item order for best-fit decreasing: by size, largest first, ties in input order."""
    return sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))


def plan_bins(sizes: Sequence[int], *, capacity: int, max_items: int,
              tries: int = 8) -> list[list[int]]:
    """Bins for all items: best-fit decreasing, or fewer bins filled worst-fit decreasing.

    Best-fit decreasing (BFD) first. With `max_items` the problem is cardinality-constrained
    bin packing (Krause, Shen & Schwetman 1975), where BFD can fill bins with a few large items
    and leave many small ones for bins capped at `max_items`: on mixed images and videos it then
    needs about 30 % more bins than `lower = ceil(max(sum / capacity, len / max_items))` (94
    instead of 72, BENCHMARKS.md). So when BFD needs more than `lower` bins, each m = lower,
    lower + 1, ... (at most `tries` values, below BFD's count) is tried with the items largest
    first into m bins by worst fit (most room, which spreads items and slots: LPT, Graham 1969);
    the first m that fits wins. `tries=0`: BFD only.

    Returns, per bin, the item indices in placement order (largest first); bins in the order
    they were opened. Deterministic: depends on the sizes only.
    """
    order = decreasing(sizes)
    ordered = [sizes[i] for i in order]
    room: list[int] = []
    count: list[int] = []
    placed = best_fit(ordered, room, count, capacity=capacity, max_items=max_items)
    lower = max(-(-sum(sizes) // capacity), -(-len(sizes) // max_items))
    for m in range(lower, min(len(room), lower + tries)):
        fixed = best_fit(ordered, [capacity] * m, [0] * m, capacity=capacity,
                         max_items=max_items, worst=True, new_bins=False)
        if fixed is not None:
            placed, room = fixed, [0] * m
            break
    bins: list[list[int]] = [[] for _ in room]
    for i, s in zip(order, placed):
        bins[s].append(i)
    return bins


class _LookaheadIterator(grain.DatasetIterator):
    """`plan_bins` over `lookahead` new records plus those of the bins kept open; see LookaheadPack.

    A round reads `lookahead` records (fewer at the end of the stream) and plans them together
    with the records of the open bins (`plan_bins`: the open bins are not committed, their
    records are planned again). The `open_bins` bins with the most room that are not full
    (`capacity` or `max_items` reached) and hold no record read more than `MAX_ROUNDS_OPEN`
    rounds ago (bounding the wait and the re-reading on restore) stay open; the others close,
    each topped up with the largest records of the open bins that still fit, and are yielded
    one at a time, in an order shuffled per round (plan order would put the largest records
    first, so batches would come grouped by size), built by `build`. At the end of the stream every bin closes.
    Round r starts at stream record r * lookahead.

    State: the parent's state at the start of the earliest round holding a record still held
    (in an open bin or a closed, unyielded one), that round's first record number, the
    `index_of` of the held records per bin, the number of records read and whether the parent
    is exhausted. `set_state` re-reads the parent from that round on and keeps the held
    records: the open and closed bins are re-derived exactly.
    """

    def __init__(self, parent, *, capacity: int, max_items: int, lookahead: int,
                 open_bins: int, size: Callable, index_of: Callable, build: Callable):
        super().__init__(parent)
        self._limits = dict(capacity=capacity, max_items=max_items)
        self._lookahead, self._open_bins = lookahead, open_bins
        self._size, self._index_of, self._build = size, index_of, build
        self._reset()

    def _reset(self):
        self._open: list[list[Any]] = []    # open bins: records in placement order
        self._closed: list[list[Any]] = []  # closed bins not yet yielded, oldest first
        self._read, self._done = 0, False
        self._rounds: dict[int, Any] = {}    # first record number of a round -> parent state

    def _round(self):
        self._rounds[self._read] = self._parent.get_state()
        records = [r for b in self._open for r in b]  # carried over: planned again
        carried = len(records)
        while len(records) < carried + self._lookahead and not self._done:
            try:
                records.append(next(self._parent))
                self._read += 1
            except StopIteration:
                self._done = True
        sizes = [self._size(r) for r in records]
        bins = plan_bins(sizes, **self._limits)
        keep = self._keep(bins, sizes, [self._index_of(r) for r in records])
        # Top up the closing bins with records of the open ones (largest that fits first): the
        # slack moves to the open bins, whose records are planned again anyway.
        pool = sorted((i for s in keep for i in bins[s]), key=lambda i: (-sizes[i], i))
        for s in (s for s in range(len(bins)) if s not in keep):
            room = self._limits["capacity"] - sum(sizes[i] for i in bins[s])
            for i in list(pool):
                if sizes[i] <= room and len(bins[s]) < self._limits["max_items"]:
                    bins[s].append(i)
                    pool.remove(i)
                    room -= sizes[i]
        closing = [[records[i] for i in b] for s, b in enumerate(bins) if s not in keep]
        # Plan order is largest records first: shuffle the round's bins (seeded by the records
        # read so far, so a restored stream draws the same) so batches mix sizes.
        order = np.random.default_rng(self._read).permutation(len(closing))
        self._closed += [closing[k] for k in order]
        carried = set(pool)
        self._open = [b for b in ([records[i] for i in bins[s] if i in carried] for s in keep)
                      if b]

    def _keep(self, bins, sizes, indices) -> list[int]:
        """The bins that stay open: the `open_bins` with most room, not full nor too old."""
        if self._done:
            return []
        room = [self._limits["capacity"] - sum(sizes[i] for i in b) for b in bins]
        oldest = self._read - MAX_ROUNDS_OPEN * self._lookahead  # held longer: must close
        keep = [s for s, b in enumerate(bins) if room[s] > 0
                and len(b) < self._limits["max_items"] and min(indices[i] for i in b) >= oldest]
        return sorted(sorted(keep, key=lambda s: (-room[s], -s))[:self._open_bins])

    def __next__(self):
        while not self._closed and not self._done:
            self._round()
        if not self._closed:
            raise StopIteration
        return self._build(self._closed.pop(0))

    def get_state(self) -> dict[str, Any]:
        held = [[int(self._index_of(r)) for r in b] for b in self._closed + self._open]
        first = min((i for b in held for i in b), default=self._read)
        start = max((s for s in self._rounds if s <= first), default=self._read)
        start = self._read if first == self._read else start
        self._rounds = {s: v for s, v in self._rounds.items() if s >= start}
        parent = self._rounds[start] if start < self._read else self._parent.get_state()
        return {"parent": parent, "start": start, "read": self._read, "done": self._done,
                "lookahead": self._lookahead, "closed": held[:len(self._closed)],
                "open": held[len(self._closed):]}

    def set_state(self, state: dict[str, Any]) -> None:
        check(state["lookahead"] == self._lookahead, "lookahead", self._lookahead,
              f"must equal the restored state's lookahead={state['lookahead']}")
        self._reset()
        self._parent.set_state(state["parent"])
        wanted = {i for b in state["closed"] + state["open"] for i in b}
        records = {}
        for number in range(state["start"], state["read"]):
            if number % self._lookahead == 0:
                self._rounds[number] = self._parent.get_state()
            record = next(self._parent)
            if self._index_of(record) in wanted:
                records[int(self._index_of(record))] = record
        self._read, self._done = state["read"], state["done"]
        self._closed = [[records[i] for i in b] for b in state["closed"]]
        self._open = [[records[i] for i in b] for b in state["open"]]


class LookaheadPack(grain.IterDataset):
    """Stream of bins planned (`plan_bins`) over a look-ahead window of records.

    `parent` yields records; `size(record)` is its size (<= capacity), `index_of(record)` its
    stream position (0, 1, 2, ... in order, e.g. from `map_with_index`), `build(records)` turns
    a bin's records (placement order) into the element yielded. Up to `lookahead` records plus
    the records of `open_bins` open bins are held; see `_LookaheadIterator` for the rounds and
    the state. Deterministic: the same parent stream gives the same bins.
    """

    def __init__(self, parent: grain.IterDataset, **kwargs):
        super().__init__(parent)
        self._kwargs = kwargs

    def __iter__(self):
        return _LookaheadIterator(self._parent.__iter__(), **self._kwargs)
