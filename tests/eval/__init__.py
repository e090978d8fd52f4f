"""Shared, per-process cached fixtures data for the eval tests (trained once per test process)."""

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def classifier_params():
    """The digit classifier trained from scratch with the library's defaults (~20 s)."""
    from genjax.eval.digit_classifier import train_digit_classifier

    return train_digit_classifier()


@functools.lru_cache(maxsize=4)
def moving_mnist_test(num_examples: int, num_frames: int, seed: int = 0):
    """Real one-digit Moving MNIST test videos (test digits only): uint8 (N, T, 64, 64, 1),
    labels int (N,), captions list of str."""
    from genjax.data.sources import MovingMnistSource

    source = MovingMnistSource("test", num_examples=num_examples, num_frames=num_frames, seed=seed)
    examples = [source[i] for i in range(num_examples)]
    return (np.stack([e["video"] for e in examples]), np.array([int(e["labels"][0]) for e in examples]),
            [e["caption"] for e in examples])
