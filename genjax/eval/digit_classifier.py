"""A small MNIST digit classifier, the feature net of the Moving MNIST evaluation.

It is a separate model from any generator: a 3-conv / 2-dense CNN (155,786 parameters) trained
only on the 4,000 training digits of `MnistEmbeddedSource("train")` (random shifts of up to
`MAX_SHIFT` pixels as augmentation), measured on the 1,000 held-out test digits (>= 97 %,
tested). Its 128-wide penultimate layer is the feature space of the Frechet distance.

Video frames are read one digit per frame: `crop_digits` cuts a 28 x 28 window centred on the
ink's centre of mass, the way MNIST digits themselves were centred (LeCun et al. 1998: the
centre of mass sits at pixel (14, 14) of the 28 x 28 field), and the classifier reads the crop.

Pixels: uint8 in [0, 255] at the interface; the network sees float32 in [-1, 1], channels-last.
"""

from __future__ import annotations

import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax.errors import check
from genjax.io import fs

DIGIT_SIZE = 28
FEATURE_DIM = 128
MAX_SHIFT = 2  # augmentation: random translations in [-MAX_SHIFT, MAX_SHIFT] pixels per axis
INK_THRESHOLD = 64  # uint8 levels below this do not count as ink for the centre of mass
CACHE_NAME = "digit_classifier-v1.msgpack"


class DigitClassifier(nn.Module):
    """CNN on `(B, 28, 28, 1)` float in [-1, 1]: three 3x3 stride-2 convs with ReLU (16, 32, 64
    channels: 28 -> 14 -> 7 -> 4), dense 128 + ReLU (the features), dense 10 (logits). Strided
    convs rather than max-pooling: XLA:CPU's max-pool gradient is ~15x slower to train.

    `__call__(x) -> logits (B, 10)`; `features(x) -> (B, 128)` non-negative (post-ReLU);
    `logits_and_features(x)` both.
    """

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.convs = [nn.Conv(c, (3, 3), strides=2, **kw) for c in (16, 32, 64)]
        self.hidden = nn.Dense(FEATURE_DIM, **kw)
        self.head = nn.Dense(10, **kw)

    def features(self, x):
        for conv in self.convs:
            x = nn.relu(conv(x))
        return nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def logits_and_features(self, x):
        feats = self.features(x)
        return self.head(feats), feats

    def __call__(self, x):
        return self.logits_and_features(x)[0]


_MODEL = DigitClassifier()


def _to_model_input(images_uint8) -> jnp.ndarray:
    return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def init_params(seed: int = 0):
    """Random parameters of `DigitClassifier` (a pytree of float32 arrays)."""
    x = jnp.zeros((1, DIGIT_SIZE, DIGIT_SIZE, 1), jnp.float32)
    return _MODEL.init(jax.random.key(seed), x)["params"]


@jax.jit
def _logits_and_features(params, images_uint8):
    return _MODEL.apply({"params": params}, _to_model_input(images_uint8),
                        method=DigitClassifier.logits_and_features)


def logits_and_features(params, images, *, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Logits float32 `(N, 10)` and penultimate features float32 `(N, 128)` of uint8 digits
    `(N, 28, 28, 1)` in [0, 255], in batches of `batch_size` (a short last batch is zero-padded
    to full size, so large N compiles one shape). Raises `UserError` for another dtype / shape."""
    images = np.asarray(images)
    check(images.dtype == np.uint8 and images.shape[1:] == (DIGIT_SIZE, DIGIT_SIZE, 1),
          "images", f"{images.dtype}{images.shape}", "must be uint8 (N, 28, 28, 1)")
    out_l, out_f = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        size = batch_size if len(images) > batch_size else len(chunk)
        padded = np.zeros((size,) + chunk.shape[1:], np.uint8)
        padded[:len(chunk)] = chunk
        logits, feats = _logits_and_features(params, padded)
        out_l.append(np.asarray(logits)[:len(chunk)])
        out_f.append(np.asarray(feats)[:len(chunk)])
    if not out_l:
        return np.zeros((0, 10), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(out_l), np.concatenate(out_f)


def to_digit_size(images) -> np.ndarray:
    """uint8 `(N, S, S, 1)` -> uint8 `(N, 28, 28, 1)`, the classifier's input: unchanged at S = 28,
    else resized bilinearly (`jax.image.resize`, no antialiasing) and rounded."""
    images = np.asarray(images)
    if images.shape[1:3] == (DIGIT_SIZE, DIGIT_SIZE):
        return images
    x = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), DIGIT_SIZE, DIGIT_SIZE, images.shape[-1]),
                         "bilinear")
    return np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8)


def read_digits(params, images) -> np.ndarray:
    """The digit (int `(N,)`, argmax of the logits) the classifier reads in each of the uint8 images
    `(N, S, S, 1)` of any side S (`to_digit_size`): how the generators' samples are judged against
    the requested class (tasks pixelcnn, var, dalle and the experiments). Raises `UserError` for
    another dtype / shape (`logits_and_features`)."""
    return np.argmax(logits_and_features(params, to_digit_size(images))[0], -1)


# ----------------------------------------------------------------------------- training


def _shift(images, key):
    """Translate each (28, 28, 1) image by a random integer offset in [-MAX_SHIFT, MAX_SHIFT]^2,
    filling with background (-1)."""
    padded = jnp.pad(images, ((0, 0), (MAX_SHIFT,) * 2, (MAX_SHIFT,) * 2, (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * MAX_SHIFT + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (DIGIT_SIZE, DIGIT_SIZE, 1))
    return jax.vmap(crop)(padded, offsets)


def train_digit_classifier(*, steps: int = 400, batch_size: int = 128, seed: int = 0,
                           learning_rate: float = 3e-3):
    """Train `DigitClassifier` on the 4,000 `MnistEmbeddedSource("train")` digits.

    Adam with a cosine-decayed learning rate, softmax cross-entropy, batches drawn uniformly with
    replacement, each digit shifted by up to `MAX_SHIFT` pixels. Deterministic given `seed`.
    The defaults take ~20 s on 2 busy CPU cores and reach 98.3 % on the 1,000 test digits.

    Returns:
      params: the trained parameter pytree (float32).

    Raises:
      UserError: steps or batch_size < 1.
    """
    from genjax.data.sources import MnistEmbeddedSource

    check(isinstance(steps, int) and steps >= 1, "steps", steps, "must be an int >= 1")
    check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "must be an int >= 1")
    source = MnistEmbeddedSource("train")
    images, labels = _to_model_input(source.images), jnp.asarray(source.labels)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params = init_params(seed)
    opt_state = tx.init(params)
    root = jax.random.key(seed)

    @jax.jit
    def step(params, opt_state, i):
        k_idx, k_shift = jax.random.split(jax.random.fold_in(root, i))
        idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
        x, y = _shift(images[idx], k_shift), labels[idx]

        def loss_fn(p):
            logits = _MODEL.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for i in range(steps):
        params, opt_state = step(params, opt_state, i)
    return jax.device_get(params)


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/genjax`, else `~/.cache/genjax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "genjax")


def load_or_train(cache_dir: str | None = None):
    """The classifier's params from `cache_dir/digit_classifier-v1.msgpack`, training it (with
    `train_digit_classifier()` defaults) and writing that file first if it is missing or does
    not hold this architecture's params. The write is atomic (temporary file + `os.replace`).

    Args:
      cache_dir: folder for the file; default `default_cache_dir()`.

    Returns:
      params pytree (float32 numpy arrays).
    """
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.path.join(cache_dir, CACHE_NAME)
    target = jax.device_get(init_params(0))
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                params = flax.serialization.from_bytes(target, f.read())
            if jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, params, target)):
                return params
        except (ValueError, KeyError, TypeError):
            pass  # a different or damaged file: retrain and overwrite it
    params = train_digit_classifier()
    fs.write_bytes(path, flax.serialization.to_bytes(params), "classifier cache")
    return params


# ----------------------------------------------------------------------------- video frames


def _gray(videos) -> np.ndarray:
    videos = np.asarray(videos)
    check(videos.dtype == np.uint8, "videos.dtype", str(videos.dtype), "must be uint8 in [0, 255]")
    check(videos.ndim == 5 and videos.shape[-1] in (1, 3) and min(videos.shape) > 0,
          "videos.shape", videos.shape, "must be (N, T, H, W, C) with C in {1, 3} and no empty axis")
    if videos.shape[-1] == 3:
        videos = np.rint(videos.mean(axis=-1, keepdims=True)).astype(np.uint8)
    return videos


def crop_digits(videos) -> tuple[np.ndarray, np.ndarray]:
    """Cut a 28 x 28 window around the ink of every frame.

    The ink weight of a pixel is `max(v - INK_THRESHOLD, 0)` (so faint noise does not pull the
    centre); its centre of mass c = (y, x) is placed at pixel (14, 14) of the crop, i.e. the
    window's top-left corner is `round(c) - 14`, with zeros outside the frame, as MNIST centred
    its digits. A frame without ink gives its centre.

    Args:
      videos: uint8 `(N, T, H, W, C)`, C in {1, 3} (RGB is averaged to gray), any H, W.

    Returns:
      crops uint8 `(N, T, 28, 28, 1)` and centroids float64 `(N, T, 2)` as (y, x) pixels.

    Raises:
      UserError: not uint8, not 5-D, C not in {1, 3}.
    """
    videos = _gray(videos)
    n, t, h, w, _ = videos.shape
    frames = videos[..., 0].reshape(n * t, h, w)
    ink = np.maximum(frames.astype(np.float64) - INK_THRESHOLD, 0.0)
    mass = ink.sum(axis=(1, 2))
    has_ink = mass > 0
    safe = np.where(has_ink, mass, 1.0)
    cy = np.where(has_ink, (ink.sum(axis=2) * np.arange(h)).sum(axis=1) / safe, (h - 1) / 2)
    cx = np.where(has_ink, (ink.sum(axis=1) * np.arange(w)).sum(axis=1) / safe, (w - 1) / 2)
    half = DIGIT_SIZE // 2
    padded = np.pad(frames, ((0, 0), (half, half), (half, half)))
    # In padded coordinates the window starts at round(c) - 14 + 14 = round(c), inside [0, H].
    top = np.clip(np.rint(cy).astype(np.int64), 0, h)
    left = np.clip(np.rint(cx).astype(np.int64), 0, w)
    r = np.arange(DIGIT_SIZE)
    crops = padded[np.arange(n * t)[:, None, None], (top[:, None] + r)[:, :, None],
                   (left[:, None] + r)[:, None, :]]
    return (crops.reshape(n, t, DIGIT_SIZE, DIGIT_SIZE, 1),
            np.stack([cy, cx], axis=-1).reshape(n, t, 2))


def analyse_frames(params, videos) -> dict[str, np.ndarray]:
    """Read every frame's digit: crop it (`crop_digits`) and run the classifier.

    Args:
      params: `DigitClassifier` params (`load_or_train`).
      videos: uint8 `(N, T, H, W, C)`, one digit per frame, C in {1, 3}.

    Returns:
      {"predictions": int32 (N, T) digits, "features": float32 (N, T, 128),
       "centroids": float64 (N, T, 2) ink centre (y, x) in pixels}.

    Raises:
      UserError: not uint8, not 5-D, C not in {1, 3}.
    """
    crops, centroids = crop_digits(videos)
    n, t = crops.shape[:2]
    logits, feats = logits_and_features(params, crops.reshape(n * t, DIGIT_SIZE, DIGIT_SIZE, 1))
    return {"predictions": logits.argmax(-1).astype(np.int32).reshape(n, t),
            "features": feats.reshape(n, t, FEATURE_DIM), "centroids": centroids}


def classify_video_frames(params, videos) -> np.ndarray:
    """Predicted digit int32 `(N, T)` of every frame of uint8 videos `(N, T, H, W, C)`
    (see `analyse_frames`)."""
    return analyse_frames(params, videos)["predictions"]


def centroid_speed(centroids) -> np.ndarray:
    """Mean frame-to-frame displacement of the ink centre, pixels per frame, float64 `(N,)`:
    `mean_t ||c[t+1] - c[t]||_2` from centroids `(N, T, 2)`; 0 when T == 1."""
    c = np.asarray(centroids, np.float64)
    if c.shape[1] < 2:
        return np.zeros(c.shape[0])
    return np.linalg.norm(np.diff(c, axis=1), axis=-1).mean(axis=1)


def video_features(analysis: dict[str, np.ndarray]) -> np.ndarray:
    """Per-video feature for the Frechet distance, float64 `(N, 128 + T - 1)`, from an
    `analyse_frames` result: the mean over frames of the classifier features (128: which digit,
    how it is drawn) and the trajectory `||c[t] - c[0]||` for t = 1..T-1 (T - 1: how far the ink
    centre has moved from its start, pixels; zero for a still digit, kinked at bounces).

    A still copy of real digits or real frames in shuffled order are far from real videos in
    this space, appearance alone would not see either (measured in the tests).
    """
    c = np.asarray(analysis["centroids"], np.float64)
    trajectory = np.linalg.norm(c[:, 1:] - c[:, :1], axis=-1)
    return np.concatenate([analysis["features"].mean(axis=1).astype(np.float64), trajectory], axis=1)
