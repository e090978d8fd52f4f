"""Drawing discrete tokens from logits: temperature, top-k, top-p (nucleus) and classifier-free
guidance on logits. The one place every autoregressive sampler in genjax draws a token (DALL·E's
image tokens, VAR's scales, PixelCNN's pixels, BLIP's words).

Shapes: logits (..., V) float, any leading dims (batch, positions); tokens (...) int32. Pure JAX,
jittable; the settings are Python numbers (static), so `top_k=0` / `top_p=1.0` cost nothing.

The filtering matches transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and
`TopPLogitsWarper` (tests/models/test_token_sampling.py): top-k keeps the k largest logits (ties at
the k-th value kept too), top-p keeps the smallest set of largest-probability tokens whose mass
reaches p (the most likely token always kept); the rest become -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genjax.errors import check

Array = jax.Array


def check_settings(temperature: float, top_k: int, top_p: float, vocab_size: int | None = None) -> None:
    """Raises UserError: temperature <= 0, top_k < 0 (or > vocab_size when given), top_p outside (0, 1]."""
    check(temperature > 0, "temperature", temperature, "must be > 0")
    check(int(top_k) == top_k and top_k >= 0, "top_k", top_k, "must be an integer >= 0 (0: no top-k)")
    if vocab_size is not None:
        check(top_k <= vocab_size, "top_k", top_k, f"must be <= the vocabulary size {vocab_size}")
    check(0 < top_p <= 1, "top_p", top_p, "must be in (0, 1] (1: no nucleus filtering)")


def filter_logits(logits: Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """`logits / temperature` with every token outside the top-k and the top-p nucleus set to -inf.

    Args:
      logits: (..., V) float.
      temperature: > 0; top_k: 0 (off) or 1..V; top_p: (0, 1], 1 = off.
    Returns: (..., V) float32.
    Raises: UserError, see `check_settings`.
    """
    check_settings(temperature, top_k, top_p, logits.shape[-1])
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as TopPLogitsWarper
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove = cumulative <= 1 - top_p
        remove = remove.at[..., -1].set(False)  # keep at least the most likely token
        # the smallest kept logit: a token is removed iff it is below it (ties kept)
        threshold = jnp.min(jnp.where(remove, jnp.inf, sorted_logits), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_logits(rng: Array, logits: Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """Tokens drawn from `softmax(filter_logits(logits, ...))`, independently for each leading
    index. Returns (...) int32. Raises: UserError, see `check_settings`."""
    logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def cfg_logits(cond: Array, uncond: Array, cfg_scale: float | Array) -> Array:
    """Classifier-free guidance on logits: `uncond + cfg_scale * (cond - uncond)`, so cfg_scale 1
    is the conditional model (the convention of `diffusion.guidance.cfg_denoiser`; VAR's
    `(1 + t) * cond - t * uncond` is cfg_scale = 1 + t). cond, uncond: (..., V); cfg_scale a
    scalar or broadcastable to the leading dims plus a trailing 1."""
    return uncond + jnp.asarray(cfg_scale, jnp.float32) * (cond.astype(jnp.float32) - uncond.astype(jnp.float32))
