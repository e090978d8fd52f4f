"""The latent cache: exact round trip through array_record, reuse / recompute by meta, whole-or-absent
files, and batches through the same grain pipeline as any source."""

import os

import numpy as np
import pytest

from genjax.data import latent_cache, pipeline
from genjax.errors import UserError


def batches(n=10, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(n, 2, 3, 4)).astype(np.float32)
    std = rng.uniform(0.1, 1, size=(n, 2, 3, 4)).astype(np.float32)
    label = np.arange(n, dtype=np.int32)
    for s in range(0, n, batch):
        yield {"mean": mean[s:s + batch], "std": std[s:s + batch], "label": label[s:s + batch]}


def test_round_trip_is_exact_and_in_order(tmp_path):
    spec = latent_cache.write(str(tmp_path), "train", batches(), meta={"vae": "x"})
    assert spec["num_examples"] == 10
    source = latent_cache.LatentCacheSource(str(tmp_path), "train")
    expected = {k: np.concatenate([b[k] for b in batches()]) for k in ("mean", "std", "label")}
    assert len(source) == 10
    for i in range(10):
        row = source[i]
        for k, v in expected.items():
            assert row[k].dtype == v.dtype and row[k].shape == v.shape[1:]
            np.testing.assert_array_equal(row[k], v[i])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_ragged_round_trip_is_exact_for_examples_of_any_size(tmp_path):
    """NaViT caches: every example at its own (T, H, W); the shapes travel with the records."""
    rng = np.random.default_rng(1)
    shapes = [(1, 4, 6, 8), (3, 2, 2, 8), (2, 6, 4, 8), (1, 4, 6, 8)]
    examples = [{"latents": rng.normal(size=s).astype(np.float32), "ids": rng.integers(0, 9, (1 + i,)).astype(np.int32)}
                for i, s in enumerate(shapes)]
    spec = latent_cache.write(str(tmp_path), "train", ({k: v[None] for k, v in e.items()} for e in examples),
                              meta={}, ragged=True)
    assert spec["ragged"] and spec["fields"]["latents"]["shape"] == [None, None, None, 8]
    source = latent_cache.LatentCacheSource(str(tmp_path), "train")
    for want, got in zip(examples, (source[i] for i in range(len(source)))):
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(UserError, match="ranks and dtypes"):
        latent_cache.write(str(tmp_path), "bad", iter([{"x": np.zeros((1, 2, 3))}, {"x": np.zeros((1, 2))}]),
                           meta={}, ragged=True)
    # a fixed-shape cache of the same meta is rewritten as ragged, not misread
    latent_cache.write(str(tmp_path), "mixed", batches(), meta={})
    calls = []
    latent_cache.ensure(str(tmp_path), "mixed", meta={}, ragged=True,
                        compute=lambda: calls.append(1) or ({k: v[None] for k, v in e.items()} for e in examples))
    assert calls and latent_cache.read_spec(str(tmp_path), "mixed")["ragged"]


def test_pipeline_batches_the_cache_like_any_source(tmp_path):
    latent_cache.write(str(tmp_path), "train", batches(), meta={})
    source = latent_cache.LatentCacheSource(str(tmp_path), "train")
    ds = pipeline.make_dataset(source, batch_size=5, seed=3, shard_index=0, shard_count=1)
    first, second = next(ds), next(ds)
    assert first["mean"].shape == (5, 2, 3, 4) and first["label"].dtype == np.int32
    assert sorted(np.concatenate([first["label"], second["label"]])) == list(range(10))  # one epoch


def test_ensure_reuses_a_matching_cache_and_recomputes_a_different_one(tmp_path):
    calls = []

    def compute(seed):
        def fn():
            calls.append(seed)
            return batches(seed=seed)
        return fn

    a = latent_cache.ensure(str(tmp_path), "train", meta={"vae": "a", "size": (8, 8)}, compute=compute(0))
    b = latent_cache.ensure(str(tmp_path), "train", meta={"vae": "a", "size": (8, 8)}, compute=compute(1))
    assert calls == [0]
    np.testing.assert_array_equal(a[3]["mean"], b[3]["mean"])
    c = latent_cache.ensure(str(tmp_path), "train", meta={"vae": "b", "size": (8, 8)}, compute=compute(1))
    assert calls == [0, 1]
    assert not np.array_equal(a[3]["mean"], c[3]["mean"])


def test_missing_or_unfinished_cache_and_bad_batches_raise(tmp_path):
    with pytest.raises(UserError, match=r"^latent cache=.*does not exist"):
        latent_cache.LatentCacheSource(str(tmp_path), "train")
    # Records without a spec (a run killed before the spec's rename) are not a cache.
    latent_cache.write(str(tmp_path), "train", batches(), meta={})
    os.remove(latent_cache.paths(str(tmp_path), "train")[1])
    assert latent_cache.read_spec(str(tmp_path), "train") is None
    with pytest.raises(UserError, match=r"^latent cache=.*does not exist"):
        latent_cache.LatentCacheSource(str(tmp_path), "train")

    def mixed():
        yield {"mean": np.zeros((2, 3), np.float32)}
        yield {"mean": np.zeros((2, 4), np.float32)}

    with pytest.raises(UserError, match=r"^latent cache batch=.*must match the first batch"):
        latent_cache.write(str(tmp_path), "bad", mixed(), meta={})
    assert latent_cache.read_spec(str(tmp_path), "bad") is None
    with pytest.raises(UserError, match=r"^latent cache='empty': got no examples"):
        latent_cache.write(str(tmp_path), "empty", iter(()), meta={})
