"""The evaluation's digit classifier: held-out accuracy, exact crops, caching, real Moving MNIST frames."""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from genjax.data.sources import MnistEmbeddedSource
from genjax.errors import UserError
from genjax.eval import digit_classifier as dc
from tests.eval import classifier_params, moving_mnist_test


def test_accuracy_on_held_out_test_digits():
    test = MnistEmbeddedSource("test")
    logits, feats = dc.logits_and_features(classifier_params(), test.images)
    accuracy = float(np.mean(logits.argmax(-1) == test.labels))
    assert accuracy >= 0.97, accuracy  # measured 0.983
    assert feats.shape == (1000, dc.FEATURE_DIM) and feats.min() >= 0
    # read_digits: the argmax at 28 x 28; other sides (the generators' 32 x 32) are resized first
    np.testing.assert_array_equal(dc.read_digits(classifier_params(), test.images), logits.argmax(-1))
    big = np.asarray(Image.fromarray(np.concatenate(test.images[:200, ..., 0], 0)).resize((32, 32 * 200)))
    read = dc.read_digits(classifier_params(), big.reshape(200, 32, 32, 1))
    assert np.mean(read == test.labels[:200]) >= 0.95


def test_frame_accuracy_on_real_moving_mnist_test_videos():
    videos, labels, _ = moving_mnist_test(200, 8)
    preds = dc.classify_video_frames(classifier_params(), videos)
    assert preds.shape == (200, 8)
    accuracy = float(np.mean(preds == labels[:, None]))
    assert accuracy >= 0.95, accuracy


def test_crop_is_translation_equivariant_and_centroid_exact():
    # The same digit pasted at two places of a 64 x 64 canvas: identical crops, and the
    # centroid moves by exactly the offset between the places.
    digit = MnistEmbeddedSource("test").images[:3]
    canvas = np.zeros((3, 2, 64, 64, 1), np.uint8)
    canvas[:, 0, 5:33, 7:35] = digit
    canvas[:, 1, 30:58, 21:49] = digit
    crops, centroids = dc.crop_digits(canvas)
    np.testing.assert_array_equal(crops[:, 0], crops[:, 1])
    np.testing.assert_allclose(centroids[:, 1] - centroids[:, 0], [[25, 14]] * 3, atol=1e-9)
    # The ink centre lands on pixel (14, 14) of the crop: re-cropping a crop changes nothing.
    again, c = dc.crop_digits(crops)
    np.testing.assert_array_equal(again, crops)
    np.testing.assert_allclose(c, np.rint(c), atol=0.5)
    # An empty frame gives its centre; RGB is read as gray.
    _, c = dc.crop_digits(np.zeros((1, 1, 40, 30, 3), np.uint8))
    np.testing.assert_allclose(c[0, 0], [19.5, 14.5])


def test_load_or_train_caches_atomically(tmp_path, monkeypatch):
    calls = []
    params = classifier_params()
    monkeypatch.setattr(dc, "train_digit_classifier", lambda: calls.append(1) or params)
    first = dc.load_or_train(tmp_path)
    assert calls == [1] and os.listdir(tmp_path) == [dc.CACHE_NAME]
    second = dc.load_or_train(tmp_path)
    assert calls == [1]  # read from the file, not trained again
    flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
    np.testing.assert_array_equal(flat(first), flat(second))
    (tmp_path / dc.CACHE_NAME).write_bytes(b"not msgpack")
    dc.load_or_train(tmp_path)
    assert calls == [1, 1]  # a damaged file is replaced


def test_bad_videos_are_user_errors():
    with pytest.raises(UserError, match="videos.dtype"):
        dc.crop_digits(np.zeros((1, 2, 64, 64, 1), np.float32))
    with pytest.raises(UserError, match="videos.shape"):
        dc.crop_digits(np.zeros((2, 64, 64, 1), np.uint8))
