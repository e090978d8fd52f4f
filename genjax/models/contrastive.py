"""Contrastive image-text training and evaluation: the CLIP and SigLIP losses and zero-shot accuracy.

Radford et al. 2021 (CLIP, fig. 3 and sec. 3.1.2); Zhai et al. 2023 (SigLIP, algorithm 1).
Embeddings are L2-normalised float `(n, E)` rows, as `genjax.models.clip.CLIP` returns them; the
losses take the whole global batch (or, inside `jax.shard_map`, each shard's rows and the batch
mesh axis), and `zero_shot_accuracy` classifies images / videos with one prompt per class.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.clip import CLIP

Array = jax.Array


# --------------------------------------------------------------------------- losses


def _gather(x: Array, axis_name) -> tuple[Array, Array]:
    """All-gather the batch over `axis_name` (inside shard_map): (global x, this shard's offset)."""
    if axis_name is None:
        return x, jnp.int32(0)
    return jax.lax.all_gather(x, axis_name, tiled=True), jax.lax.axis_index(axis_name) * x.shape[0]


def clip_loss(img_emb: Array, txt_emb: Array, logit_scale: Array, *, axis_name: Any = None) -> Array:
    """Symmetric InfoNCE over the whole global batch: `mean(CE(l, I) + CE(l^T, I)) / 2`.

    `l = min(exp(logit_scale), 100) * img_emb @ txt_emb^T`; pair i is (image i, text i), every
    other text / image in the GLOBAL batch is a negative.

    Args:
      img_emb, txt_emb: `(n, E)` L2-normalised embeddings (any float dtype; computed in float32).
        Under `jax.jit` with batch-sharded inputs, pass them as they are: the global batch is
        the full array and XLA gathers what it needs.
      logit_scale: scalar, the log of the inverse temperature (CLIP's learnable `t`).
      axis_name: inside `jax.shard_map`, the mesh axis (or tuple of axes) the batch is split
        over; each shard then holds its local `(n / shards, E)` rows, the other shards'
        embeddings are `all_gather`ed as negatives, and every shard returns the global loss.

    Returns:
      scalar float32 >= 0 (log n at chance for a uniform l).

    Source: Radford et al. 2021 fig. 3; the temperature clamp at 100 as OpenAI CLIP's training;
      per-shard rows + all-gather as OpenCLIP's `gather_with_grad` (equal to 1 device, tested).
    """
    img, txt = img_emb.astype(jnp.float32), txt_emb.astype(jnp.float32)
    scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), 100.0)
    all_img, offset = _gather(img, axis_name)
    all_txt, _ = _gather(txt, axis_name)
    labels = offset + jnp.arange(img.shape[0])

    def nll(logits):  # (b, n) rows of this shard -> sum of -log softmax at the label
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1))

    total = nll(scale * img @ all_txt.T) + nll(scale * txt @ all_img.T)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total / (2 * all_img.shape[0])


def siglip_loss(img_emb: Array, txt_emb: Array, logit_scale: Array, logit_bias: Array, *,
                axis_name: Any = None) -> Array:
    """Sigmoid loss over the whole global batch: `-sum(log_sigmoid(z * l)) / n`.

    `l = exp(logit_scale) * img_emb @ txt_emb^T + logit_bias` `(n, n)`, z = +1 on the diagonal
    (matching pairs) and -1 elsewhere, n the global batch size.

    Args:
      img_emb, txt_emb: `(n, E)` L2-normalised (computed in float32); jit-sharded as they are.
      logit_scale: scalar log temperature (init log 10); logit_bias: scalar (init -10).
      axis_name: inside `jax.shard_map`, the batch mesh axis (or axes): each shard scores its
        local images against the all-gathered texts; every shard returns the global loss.

    Returns:
      scalar float32 >= 0.

    Source: Zhai et al. 2023, algorithm 1 (equal to 1 device under sharding, tested).
    """
    img, txt = img_emb.astype(jnp.float32), txt_emb.astype(jnp.float32)
    all_txt, offset = _gather(txt, axis_name)
    logits = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * img @ all_txt.T + jnp.asarray(logit_bias, jnp.float32)
    z = jnp.where(offset + jnp.arange(img.shape[0])[:, None] == jnp.arange(all_txt.shape[0])[None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total / all_txt.shape[0]


# --------------------------------------------------------------------------- zero-shot


def zero_shot_accuracy(params: Any, module: CLIP, images: np.ndarray, labels: np.ndarray, tokenizer: Any, *,
                       prompts: Sequence[str] = tuple(f"digit {n}" for n in range(10)),
                       batch_size: int = 500) -> float:
    """Zero-shot classification accuracy: each image gets the class whose prompt embeds closest.

    Args:
      params: the CLIP's variables (`{"params": ...}`, boxed or plain).
      module: the `CLIP`.
      images: `(N, H, W, C)` images or `(N, T, H, W, C)` videos (video tower), uint8 in
        [0, 255] (scaled to [-1, 1]) or float already in [-1, 1].
      labels: `(N,)` int, the index of the true prompt.
      tokenizer: `encode(texts, max_length) -> (ids, mask)` (`genjax.models.tokenizer`).
      prompts: one text per class; default "digit 0" ... "digit 9".
      batch_size: images per jitted forward.

    Returns:
      accuracy in [0, 1] (chance = 1 / len(prompts)).

    Raises:
      UserError: images not 4-D / 5-D, or labels not `(N,)`.

    Source: Radford et al. 2021 sec. 3.1.2 (zero-shot transfer with prompts).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    check(images.ndim in (4, 5), "images.shape", images.shape, "must be (N, H, W, C) or (N, T, H, W, C)")
    check(labels.shape == images.shape[:1], "labels.shape", labels.shape, f"must be (N,)={images.shape[:1]}")
    ids, mask = tokenizer.encode(list(prompts), module.context_length)
    text = jax.jit(functools.partial(module.apply, method=CLIP.encode_text))(params, ids, mask)
    method = CLIP.encode_image if images.ndim == 4 else CLIP.encode_video
    encode = jax.jit(functools.partial(module.apply, method=method))
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        pred = np.asarray(jnp.argmax(encode(params, x) @ text.T, axis=-1))
        correct += int((pred == labels[start:start + batch_size]).sum())
    return correct / len(images)
