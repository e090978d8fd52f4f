"""NaViT packing: exact round trips, packing invariants, greedy first-fit, token dropping,
padding on a mixed resolution / duration distribution, grain resume, user errors."""

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genjax.data.packing import (first_fit_bins, kept_masks, pack, packed_batches,
                                 patchify_video, unpack, unpatchify_video)
from genjax.errors import UserError


def _patches_by_loops(video, patch_size):
    """Reference patchify: explicit loops over the (t, h, w) grid, values in (pt, ph, pw, C)."""
    pt, ph, pw = patch_size
    nt, nh, nw = (s // p for s, p in zip(video.shape[:3], patch_size))
    return np.stack([video[t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw].ravel()
                     for t in range(nt) for h in range(nh) for w in range(nw)])


@st.composite
def _videos(draw):
    """A small mixed list: 1-8 videos of different durations / sizes, one patch size."""
    patch_size = draw(st.sampled_from([(1, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1)]))
    channels = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    grids = draw(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
                          min_size=1, max_size=8))
    videos = [rng.standard_normal((*(g * p for g, p in zip(grid, patch_size)), channels))
              .astype(np.float32) for grid in grids]
    seq_len = max(int(np.prod(g)) for g in grids) + draw(st.integers(0, 12))
    return videos, patch_size, seq_len, draw(st.integers(1, 4))


def test_patchify_matches_loops_and_inverts():
    video = np.random.default_rng(0).standard_normal((4, 6, 10, 3)).astype(np.float32)
    tokens, positions = patchify_video(video, (2, 3, 5))
    np.testing.assert_array_equal(tokens, _patches_by_loops(video, (2, 3, 5)))
    np.testing.assert_array_equal(positions, [(t, h, w) for t in range(2) for h in range(2)
                                              for w in range(2)])
    np.testing.assert_array_equal(unpatchify_video(tokens, (2, 2, 2), (2, 3, 5)), video)


@settings(max_examples=25, deadline=None)
@given(_videos())
def test_unpack_inverts_pack_exactly(case):
    videos, patch_size, seq_len, max_per_seq = case
    back = unpack(pack(videos, seq_len=seq_len, patch_size=patch_size, max_per_seq=max_per_seq))
    assert len(back) == len(videos)
    for original, restored in zip(videos, back):
        assert restored.dtype == np.float32 and restored.shape == original.shape
        assert np.array_equal(restored.view(np.uint32), original.view(np.uint32))  # bit-exact


@settings(max_examples=25, deadline=None)
@given(_videos())
def test_pack_layout_invariants(case):
    videos, patch_size, seq_len, max_per_seq = case
    packed = pack(videos, seq_len=seq_len, patch_size=patch_size, max_per_seq=max_per_seq)
    S = len(packed["tokens"])
    assert packed["tokens"].shape == (S, seq_len, np.prod(patch_size) * videos[0].shape[-1])
    assert packed["segment_ids"].shape == (S, seq_len)
    assert packed["example_index"].shape == (S, max_per_seq)
    seen = []
    for s in range(S):
        seg, index = packed["segment_ids"][s], packed["example_index"][s]
        k = int(np.sum(index >= 0))
        assert 1 <= k <= max_per_seq and np.all(index[:k] >= 0) and np.all(index[k:] == -1)
        # Segments 1..k in order, contiguous, then padding: zero tokens and positions.
        used = int(np.sum(seg > 0))
        assert np.all(np.diff(seg[:used]) >= 0) and set(seg[:used]) == set(range(1, k + 1))
        assert np.all(seg[used:] == 0)
        assert not packed["tokens"][s, used:].any() and not packed["positions"][s, used:].any()
        for j in range(k):
            i = int(index[j])
            seen.append(i)
            here = seg == j + 1
            grid = tuple(packed["example_shape"][s, j])
            assert grid == tuple(n // p for n, p in zip(videos[i].shape[:3], patch_size))
            assert tuple(packed["video_shape"][s, j]) == videos[i].shape
            # Positions enumerate the example's grid exactly once, row-major.
            np.testing.assert_array_equal(packed["positions"][s][here],
                                          np.indices(grid).reshape(3, -1).T)
            np.testing.assert_array_equal(packed["tokens"][s][here],
                                          _patches_by_loops(videos[i], patch_size))
    assert sorted(seen) == list(range(len(videos)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=40), st.integers(0, 10),
       st.integers(1, 5))
def test_first_fit_is_greedy_in_input_order(num_tokens, extra, max_per_seq):
    seq_len = max(num_tokens) + extra
    bins = first_fit_bins(num_tokens, seq_len=seq_len, max_per_seq=max_per_seq)
    assert sorted(i for b in bins for i in b) == list(range(len(num_tokens)))
    for s, members in enumerate(bins):
        assert members == sorted(members) and len(members) <= max_per_seq
        assert sum(num_tokens[i] for i in members) <= seq_len
        # Each example was refused by every earlier sequence as it stood when it arrived.
        for i in members:
            for earlier in bins[:s]:
                before = [e for e in earlier if e < i]
                assert (len(before) >= max_per_seq
                        or sum(num_tokens[e] for e in before) + num_tokens[i] > seq_len)


def _mixed_grids(n, pt, rng):
    """NaViT-style mix: sides 64-256 px in steps of 16, aspect 1:2 to 2:1, 1-16 frames."""
    sides, grids = np.arange(64, 257, 16), []
    while len(grids) < n:
        h, w = rng.choice(sides, 2)
        if 0.5 <= h / w <= 2:
            frames = rng.integers(1, 17) if pt == 1 else pt * rng.integers(1, 16 // pt + 1)
            grids.append((frames // pt, h // 16, w // 16))
    return grids


@pytest.mark.parametrize("pt, seq_len", [(1, 4096), (2, 2048)])
def test_padding_at_most_two_percent_on_mixed_shapes(pt, seq_len):
    # Shapes only: the plan `pack` uses, without allocating pixels. NaViT reports < 2 % padding.
    num_tokens = [int(np.prod(g)) for g in _mixed_grids(1000, pt, np.random.default_rng(0))]
    bins = first_fit_bins(num_tokens, seq_len=seq_len, max_per_seq=16)
    padding = 1 - sum(num_tokens) / (len(bins) * seq_len)
    assert 0 < padding <= 0.02


def test_token_dropping_rates_positions_and_determinism():
    rng = np.random.default_rng(0)
    videos = [rng.standard_normal((t, 8, 8, 2)).astype(np.float32)
              for t in rng.integers(1, 5, size=200)]
    kw = dict(seq_len=64, patch_size=(1, 2, 2), max_per_seq=8)
    packed = pack(videos, drop_rate=0.25, rng=np.random.default_rng(1), **kw)
    masks = kept_masks(packed)
    for video, mask, restored in zip(videos, masks, unpack(packed)):
        assert mask.sum() == max(1, round(0.75 * mask.size))
        # Kept tokens keep their values and (t, h, w) positions; dropped patches come back zero.
        pixel_mask = mask.repeat(2, axis=1).repeat(2, axis=2)[..., None]
        np.testing.assert_array_equal(restored, np.where(pixel_mask, video, 0))

    a, b = 2.0, 5.0
    beta = pack(videos, drop_rate=("beta", a, b), rng=np.random.default_rng(2), **kw)
    kept = np.mean([m.mean() for m in kept_masks(beta)])
    assert abs(kept - b / (a + b)) < 0.04  # E[1 - rate] = b / (a + b); SE ~ 0.012
    again = pack(videos, drop_rate=("beta", a, b), rng=np.random.default_rng(2), **kw)
    other = pack(videos, drop_rate=("beta", a, b), rng=np.random.default_rng(3), **kw)
    assert all(np.array_equal(beta[k], again[k]) for k in beta)
    assert not np.array_equal(beta["positions"], other["positions"])


def test_dropping_lets_a_long_example_fit():
    video = np.zeros((4, 4, 4, 1), np.float32)  # 64 patches of (1, 1, 1)
    with pytest.raises(UserError, match=r"videos\[0\]"):
        pack([video], seq_len=40, patch_size=(1, 1, 1), max_per_seq=2)
    packed = pack([video], seq_len=40, patch_size=(1, 1, 1), max_per_seq=2, drop_rate=0.5,
                  rng=np.random.default_rng(0))
    assert (packed["segment_ids"] == 1).sum() == 32


def _stream_source():
    rng = np.random.default_rng(0)
    return [{"video": rng.integers(0, 256, (int(rng.integers(1, 4)), 4 * int(rng.integers(1, 4)),
                                           4 * int(rng.integers(1, 3)), 1), dtype=np.uint8),
             "label": np.int32(k)} for k in range(30)]


def test_packed_batches_contents_and_resume():
    examples = grain.MapDataset.source(_stream_source()).shuffle(seed=3).repeat(None)
    kw = dict(seq_len=48, patch_size=(1, 4, 4), max_per_seq=3, sequences_per_batch=2,
              num_packing_bins=4, example_fields=("label",))
    batches = iter(packed_batches(examples.to_iter_dataset(), **kw))
    first = [next(batches) for _ in range(5)]
    for batch in first:  # each batch holds whole stream examples at their stream positions
        assert batch["tokens"].shape == (2, 48, 16) and batch["label"].shape == (2, 3)
        indices = sorted(i for i in batch["example_index"].ravel() if i >= 0)
        for i, video in zip(indices, unpack(batch)):
            np.testing.assert_array_equal(video, examples[int(i)]["video"])
        filled = batch["example_index"] >= 0
        labels = [examples[int(i)]["label"] for i in batch["example_index"][filled]]
        np.testing.assert_array_equal(batch["label"][filled], labels)
    seen = sorted(i for b in first for i in b["example_index"].ravel() if i >= 0)
    assert seen == list(range(len(seen)))  # no example lost or repeated

    # Resume (with token dropping, so the per-example rngs must resume too).
    kw.update(drop_rate=("beta", 2.0, 5.0), seed=7)
    stream = iter(packed_batches(examples.to_iter_dataset(), **kw))
    for _ in range(7):
        next(stream)
    state = stream.get_state()
    expected = [next(stream) for _ in range(20)]
    resumed = iter(packed_batches(examples.to_iter_dataset(), **kw))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(20))):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("kwargs, videos, match", [
    ({}, [np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1))], r"videos\[1\] shape=\(1, 4, 5, 1\)"),
    ({}, [np.zeros((1, 4, 4, 1)), np.zeros((1, 8, 8, 1))], r"videos\[1\].*seq_len=8"),
    ({}, [np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 3))], r"videos\[1\].*channels"),
    ({}, [np.zeros((4, 4, 1))], r"videos\[0\] shape"),
    ({"max_per_seq": 0}, [np.zeros((1, 4, 4, 1))], "max_per_seq=0"),
    ({"seq_len": 0}, [np.zeros((1, 4, 4, 1))], "seq_len=0"),
    ({"patch_size": (2, 2)}, [np.zeros((1, 4, 4, 1))], "patch_size"),
    ({"drop_rate": 0.5}, [np.zeros((1, 4, 4, 1))], "rng=None"),
    ({"drop_rate": 1.0, "rng": np.random.default_rng(0)}, [np.zeros((1, 4, 4, 1))],
     "drop_rate=1.0"),
    ({}, [], "videos=0"),
])
def test_pack_user_errors(kwargs, videos, match):
    args = dict(seq_len=8, patch_size=(1, 2, 2), max_per_seq=2) | kwargs
    with pytest.raises(UserError, match=match):
        pack(videos, **args)


def test_packed_batches_user_errors():
    examples = grain.MapDataset.source([{"video": np.zeros((1, 4, 5, 1))}]).to_iter_dataset()
    kw = dict(seq_len=8, patch_size=(1, 2, 2), max_per_seq=2, sequences_per_batch=1)
    with pytest.raises(UserError, match="sequences_per_batch=0"):
        packed_batches(examples, **kw | {"sequences_per_batch": 0})
    with pytest.raises(UserError, match=r"example 0 shape=\(1, 4, 5, 1\)"):
        next(iter(packed_batches(examples, **kw)))
