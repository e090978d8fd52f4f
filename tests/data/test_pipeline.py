"""grain pipeline: resumed == uninterrupted for every source type, sharding, seeding, errors."""

import grain
import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from genjax.data import transforms as T
from genjax.data.pipeline import batches_per_epoch, make_dataset
from genjax.data.sources import make_source
from genjax.errors import UserError
from genjax.io import media

# Small prefetch: the 2-core test machine; one test keeps grain's defaults.
SMALL_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
# Every source holds 120 examples: 100 batches of 2 then cross an epoch boundary, and grain's
# index_shuffle stays fast (it takes milliseconds per index on datasets of ~10 examples).
N = 120


def _image_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "fox"):
        (root / cls).mkdir(parents=True)
        for k in range(40):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{k}.png")
    return f"image_folder:{root}"


def _video_folder(root):
    root.mkdir()
    rng = np.random.default_rng(1)
    for k in range(60):  # GIFs decode in-process (Pillow): 200+ reads stay fast
        frames = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        iio.imwrite(root / f"clip{k}.gif", frames, duration=100, loop=0)
    media.write_mp4(root / "movie.mp4", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return f"video_folder:{root}"


SOURCES = {
    "moving_mnist": lambda tmp: make_source("moving_mnist", num_examples=N, num_frames=3,
                                            image_size=28, num_digits=2),
    "mnist_embedded": lambda tmp: make_source("mnist_embedded", split="test"),  # 1,000
    "tfds_mnist": lambda tmp: make_source("mnist", split="train"),
    "image_folder": lambda tmp: make_source(_image_folder(tmp / "images")),
    "video_folder": lambda tmp: make_source(_video_folder(tmp / "videos"), clip_length=2),
}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


@pytest.mark.parametrize("kind", list(SOURCES))
def test_restored_iterator_continues_exactly(kind, tmp_path):
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
        source = SOURCES[kind](tmp_path)

    def fresh():
        return make_dataset(source, batch_size=2, seed=3, shard_index=0, shard_count=1,
                            transforms=(T.RandomFlip(), T.ToFloat()), read_options=SMALL_READ)

    it = fresh()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 100)  # into the second epoch for every source but mnist_embedded
    restored = fresh()
    restored.set_state(state)
    _assert_same_batches(_take(restored, 100), expected)
    batch = expected[0]
    pixels = batch["video" if "video" in batch else "image"]
    assert pixels.dtype == np.float32 and pixels.shape[0] == 2 and -1 <= pixels.min() <= pixels.max() <= 1
    assert batch["caption"].shape == (2,) and isinstance(batch["caption"][0], str)


def test_restore_with_default_prefetch():
    source = make_source("moving_mnist", num_examples=N, num_frames=2, image_size=28)
    it = make_dataset(source, batch_size=4, seed=0, shard_index=0, shard_count=1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 40)
    restored = make_dataset(source, batch_size=4, seed=0)  # shard from jax: process 0 of 1
    restored.set_state(state)
    _assert_same_batches(_take(restored, 40), expected)


def _indices(num_examples, **kw):
    source = [{"index": np.int64(i)} for i in range(num_examples)]
    return np.concatenate([b["index"] for b in make_dataset(source, **kw)]).tolist()


def test_shards_are_disjoint_cover_the_data_and_are_even():
    kw = dict(batch_size=4, seed=5, num_epochs=1)
    shard0 = _indices(20, shard_index=0, shard_count=2, **kw)
    shard1 = _indices(20, shard_index=1, shard_count=2, **kw)
    assert len(shard0) == len(shard1) == 10
    assert sorted(shard0 + shard1) == list(range(20))
    # 21 examples on 2 processes: both see 10, one example is left out.
    odd = [_indices(21, shard_index=i, shard_count=2, **kw) for i in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 10 and not set(odd[0]) & set(odd[1])


def test_seeds_and_epochs_set_the_order():
    kw = dict(batch_size=3, num_epochs=1, shard_index=0, shard_count=1)
    assert _indices(30, seed=1, **kw) == _indices(30, seed=1, **kw)
    assert _indices(30, seed=1, **kw) != _indices(30, seed=2, **kw)
    assert sorted(_indices(30, seed=1, **kw)) == list(range(30))
    assert _indices(30, seed=1, shuffle=False, **kw) == list(range(30))
    two = _indices(30, seed=1, **{**kw, "num_epochs": 2})
    assert sorted(two[:30]) == sorted(two[30:]) == list(range(30)) and two[:30] != two[30:]


@pytest.mark.parametrize("n, batch_size, shards, drop", [(20, 4, 2, True), (21, 4, 2, True),
                                                          (23, 6, 1, False), (7, 2, 1, True)])
def test_batches_per_epoch_counts_what_one_epoch_yields(n, batch_size, shards, drop):
    source = [{"index": np.int64(i)} for i in range(n)]
    yielded = list(make_dataset(source, batch_size=batch_size, num_epochs=1, shard_index=0,
                                shard_count=shards, drop_remainder=drop))
    assert len(yielded) == batches_per_epoch(n, batch_size=batch_size, shard_count=shards,
                                             drop_remainder=drop)


@pytest.mark.parametrize("kw, field", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=3, shard_count=2, shard_index=0), "batch_size"),
    (dict(batch_size=16, shard_count=2, shard_index=0), "batch_size"),  # 5 per shard < 8
    (dict(batch_size=2, shard_count=2, shard_index=2), "shard_index"),
    (dict(batch_size=2, num_epochs=0), "num_epochs"),
])
def test_bad_arguments_are_user_errors(kw, field):
    source = [{"index": np.int64(i)} for i in range(10)]
    with pytest.raises(UserError, match=f"^{field}="):
        make_dataset(source, **kw)



def test_packed_latent_batches_unpack_to_each_example_encoded_alone():
    """recipes.packed_latent_data: mixed-size Moving MNIST clips, each encoded alone, packed into
    fixed (S, L) batches; unpacking a batch gives back every example's [mean | std] exactly, with
    its caption's tokens in its slot (packed == alone)."""
    import os

    from genjax.config import load_config
    from genjax.data import packing, pipeline, recipes
    from genjax.models.tokenizer import ByteTokenizer
    from genjax.tasks.clip import tokenize_fn

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = load_config(os.path.join(root, "configs", "video_dit_moving_mnist.py") + ":smoke=True,packed=True")
    tokenize = tokenize_fn(ByteTokenizer(), 16, "video")

    def posterior(x):  # a stand-in causal encoder: f = 2 in time and space (T -> 1 + (T - 1) / 2), 2 channels
        mean = x[:, ::2, ::2, ::2, :].repeat(2, axis=-1) * np.array([1.0, -0.5], np.float32)
        return mean, np.abs(mean) + 0.1

    make_data = recipes.packed_latent_data(config, posterior, patch_size=(1, 2, 2), inputs=tokenize)
    data = make_data("unused", shard_index=0, shard_count=1)
    config.unlock()
    config.data.packing.drop_rate = 0.5  # NaViT token dropping: each example keeps half its tokens
    dropped = next(recipes.packed_latent_data(config, posterior, patch_size=(1, 2, 2), inputs=tokenize)(
        "unused", shard_index=0, shard_count=1))
    for s, m in zip(*np.nonzero(dropped["example_index"] >= 0)):
        kept = int(np.sum(dropped["segment_ids"][s] == m + 1))
        assert kept == max(1, round(0.5 * int(np.prod(dropped["example_shape"][s, m]))))
    stream = pipeline.example_dataset(recipes.source(config, "train"), seed=config.seed, shard_index=0,
                                      shard_count=1, transforms=(T.ToFloat(keys=("video",)), tokenize))
    shapes = set()
    for _ in range(3):
        batch = next(data)
        assert batch["tokens"].shape == (2, 512, 2 * 2 * 2 * 2) and batch["ids"].shape == (2, 4, 16)
        indices = batch["example_index"][batch["example_index"] >= 0]
        for video, index in zip(packing.unpack(batch), np.sort(indices)):
            example = stream[int(index)]
            mean, std = posterior(example["video"][None])
            np.testing.assert_array_equal(video, np.concatenate([mean[0], std[0]], axis=-1))
            s, m = (int(a[0]) for a in np.nonzero(batch["example_index"] == index))
            np.testing.assert_array_equal(batch["ids"][s, m], example["ids"])
            shapes.add(example["video"].shape)
    assert len(shapes) >= 3  # images and clips of several sizes in the same batches


def test_unreadable_examples_are_skipped_named_and_counted(capsys):
    """skip_unreadable: an example whose read raises UserError (a clip that does not decode) is
    left out with one line naming it; the others come in order and the run goes on."""
    from genjax.data.pipeline import SkipUnreadable

    class Flaky:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i in (2, 5):
                raise UserError(f"path='clip{i}.mp4': could not decode clip {i}")
            return {"x": np.int32(i)}

    it = make_dataset(Flaky(), batch_size=3, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                      skip_unreadable=True, drop_remainder=False)
    assert [b["x"].tolist() for b in it] == [[0, 1, 3], [4, 6, 7]]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("genjax: warning: skipping unreadable example 2 (1 so far): "
                                               "path='clip2.mp4'")
    assert len(SkipUnreadable(Flaky())) == 8
