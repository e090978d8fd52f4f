"""adaLN-Zero pieces shared by the DiT family (`dit.DiT`, `video_dit.VideoDiT`).

Dimension letters are defined in `genjax.models.layers`; Dc is the conditioning-token width
(`context_dim`), G the number of condition rows per example (1, or one per frame / packed example).

  c (B, D) or (B, G, D) -> Dense(SiLU(c)), zero-initialised -> shift / scale / gate rows
  per_token: condition rows -> tokens (B, 1 | L, F)
  modulate(LayerNorm(x), shift, scale) = LN(x) * (1 + scale) + shift
  TextEmbedder: text tokens (B, S, Dc) -> context (B, S, D), mask, pooled (B, D); null text for CFG
  FinalLayer: adaLN LayerNorm -> Dense(D -> P), both zero-initialised

Sources: Peebles & Xie 2023 (DiT sec. 3.2, adaLN-Zero); Chen et al. 2023 (PixArt-alpha, caption
projection and cross-attention); Esser et al. 2024 (SD3, pooled text projection); Ho & Salimans
2022 (classifier-free guidance dropout).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.layers import LayerNorm, Mlp, logical, zeros
from genjax.parallel.axes import EMBED, MLP, VOCAB

Dtype = Any
Array = jax.Array


def modulate(h: Array, shift: Array, scale: Array) -> Array:
    """adaLN: `h * (1 + scale) + shift`; h `(B, L, D)`, shift / scale `(B, 1, D)` or `(B, L, D)`.

    Source: DiT `modulate` (Peebles & Xie 2023, sec. 3.2).
    """
    return h * (1 + scale) + shift


def per_token(mod: Array, c_index: Array | None = None) -> Array:
    """Condition rows -> tokens, float32: `(B, F)` -> `(B, 1, F)`; `(B, G, F)` with `c_index (B, L)` -> `(B, L, F)`.

    `c_index[b, l]` in [0, G) names the condition row of token l (its example in a packed sequence,
    its frame for per-frame timesteps); indices are clipped into range (padding tokens take row 0).
    """
    mod = mod.astype(jnp.float32)
    if mod.ndim == 2:
        return mod[:, None, :]
    if mod.shape[1] == 1:
        return mod
    index = jnp.clip(c_index, 0, mod.shape[1] - 1)[..., None]
    return jnp.take_along_axis(mod, index, axis=1)


def modulations(c: Array, n: int, width: int, c_index: Array | None = None, *, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, name: str = "adaLN_modulation") -> list[Array]:
    """adaLN-Zero modulations: Dense(SiLU(c)) -> n rows of width `width`, per token, float32.

    Call only inside an `@nn.compact` method (creates the zero-initialised Dense `name`, kernel
    axes `(embed, mlp)`, so a fresh block is the identity). c: `(B, D)` or `(B, G, D)` with
    `c_index (B, L)` (see `per_token`). Returns n arrays `(B, 1 | L, width)` float32.

    Source: DiT `adaLN_modulation` (Peebles & Xie 2023 sec. 3.2, Fig. 3).
    """
    mod = nn.Dense(n * width, dtype=dtype, param_dtype=param_dtype, kernel_init=zeros((EMBED, MLP)),
                   bias_init=zeros((MLP,)), name=name)(nn.silu(c))
    return [per_token(m, c_index) for m in jnp.split(mod, n, axis=-1)]  # gathered one by one: no (B, L, n*width)


def adaln_norm(x: Array, shift: Array, scale: Array, *, eps: float = 1e-6, dtype: Dtype = jnp.float32,
               name: str) -> Array:
    """`modulate(LayerNorm(x), shift, scale)`: a non-affine float32 LayerNorm (eps 1e-6, DiT) named
    `name`, output in `dtype`. Call only inside an `@nn.compact` method. `(B, L, D)` -> `(B, L, D)`."""
    h = LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=jnp.float32, name=name)(x)
    return modulate(h, shift, scale).astype(dtype)


def check_labels(y: Any, num_classes: int, null_class: bool) -> None:
    """UserError unless class labels `y` are integers and, when concrete (not traced inside jit),
    in [0, num_classes) ([0, num_classes] with a null class: id num_classes is "no label"). An
    out-of-range id would read a clamped or NaN embedding; a float label would be truncated."""
    dtype = y.dtype if isinstance(y, jax.core.Tracer) else np.asarray(y).dtype
    check(np.issubdtype(dtype, np.integer), "y.dtype", str(dtype),
          "class labels must be integers (float labels would be truncated)")
    if isinstance(y, jax.core.Tracer):
        return
    a = np.asarray(y)
    hi = num_classes + int(null_class)
    bad = a[(a < 0) | (a >= hi)]
    check(bad.size == 0, "y", bad.flat[0].item() if bad.size else None,
          f"class labels must be in [0, {hi})" + (f" ({num_classes} is the null class)" if null_class else ""))


def embed_labels(y: Array, drop: Array | None, num_classes: int, null_class: bool, features: int, *,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str = "y_embedder") -> Array:
    """Class labels -> `(..., D)` embeddings, dropped labels replaced by the null class id `num_classes`.

    Call only inside an `@nn.compact` method (creates the `nn.Embed` `name` with
    `num_classes + null_class` rows, normal(0.02), axes `(vocab, embed)`). y: int `(...)`;
    drop: bool of y's shape or None (`cfg_drop`). Source: DiT `LabelEmbedder`.

    Raises:
      UserError: see `check_labels`.
    """
    check_labels(y, num_classes, null_class)
    y = jnp.asarray(y, jnp.int32)
    if drop is not None:
        y = jnp.where(drop, num_classes, y)
    return nn.Embed(num_classes + int(null_class), features, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=logical(nn.initializers.normal(0.02), (VOCAB, EMBED)), name=name)(y)


def check_text(text, text_mask, text_pooled, lead: tuple[int, ...], context_dim: int | None) -> None:
    """UserError unless text `(*lead, S, context_dim)`, text_mask `(*lead, S)`, text_pooled `(*lead, context_dim)`
    are given together (text_pooled optional) when `context_dim` is set, and none of them otherwise."""
    if context_dim is None:
        check(text is None and text_mask is None and text_pooled is None, "text", "given",
              "needs a model built with context_dim")
        return
    shape = None if text is None else tuple(jnp.shape(text))
    check(shape is not None and len(shape) == len(lead) + 2 and shape[:len(lead)] == lead
          and shape[-1] == context_dim, "text.shape", shape, f"must be {(*lead, 'S_text', context_dim)}")
    check(text_mask is not None, "text_mask", None, "must be given with text (1 = real token, 0 = padding)")
    check(tuple(jnp.shape(text_mask)) == shape[:-1], "text_mask.shape", tuple(jnp.shape(text_mask)),
          f"must be {shape[:-1]}")
    check(text_pooled is None or tuple(jnp.shape(text_pooled)) == (*lead, context_dim), "text_pooled.shape",
          None if text_pooled is None else tuple(jnp.shape(text_pooled)), f"must be {(*lead, context_dim)}")


def cfg_drop(module: nn.Module, shape: tuple[int, ...], prob: float, train: bool,
              force_drop_ids: Array | None = None) -> Array | None:
    """Which examples get the null condition (CFG dropout), bool of `shape` or None (keep all).

    `force_drop_ids == 1` if given; else, with train and an rng named "dropout", a Bernoulli(prob)
    draw of `shape`; else None.
    """
    if force_drop_ids is not None:
        return jnp.asarray(force_drop_ids) == 1
    if train and prob > 0 and module.has_rng("dropout"):
        return jax.random.uniform(module.make_rng("dropout"), shape) < prob
    return None


class TextEmbedder(nn.Module):
    """Text-encoder outputs -> cross-attention context and a pooled adaLN condition, with null text for CFG.

    Params: `null_text (Dc,)` (the unconditional token) and `null_pooled (Dc,)`, normal(0.02);
    `caption_projection` (Mlp Dc -> D -> D, GELU-tanh: PixArt-alpha `caption_projection`) and
    `pooled_projection` (Mlp Dc -> D -> D, SiLU: SD3 `CombinedTimestepTextProjEmbeddings`).

    Call `(text (N, S, Dc), text_mask (N, S), text_pooled (N, Dc) | None, drop (N,) bool | None)`:
      - pooled = `text_pooled`, or the masked mean of the text tokens (masked tokens excluded with
        `jnp.where`, so they never reach the output; an all-masked row pools to 0);
      - where `drop`: the tokens become `null_text` everywhere with a mask of one valid token
        (the first), and the pooled vector `null_pooled` (classifier-free guidance dropout, Ho &
        Salimans 2022; PixArt-alpha replaces the caption by its learned null embedding).
    Returns `(context (N, S, D) dtype, context_mask (N, S) bool, pooled (N, D) dtype)`.
    """

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: Array, text_mask: Array, text_pooled: Array | None = None,
                 drop: Array | None = None) -> tuple[Array, Array, Array]:
        dt, d = text.shape[-1], self.hidden_size
        init = logical(nn.initializers.normal(0.02), (EMBED,))
        null_text = self.param("null_text", init, (dt,), self.param_dtype)
        null_pooled = self.param("null_pooled", init, (dt,), self.param_dtype)
        mask = jnp.asarray(text_mask).astype(bool)
        text = text.astype(jnp.float32)
        if text_pooled is None:
            total = jnp.where(mask[..., None], text, 0.0).sum(axis=1)
            text_pooled = total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
        pooled = jnp.asarray(text_pooled, jnp.float32)
        if drop is not None:
            drop = jnp.asarray(drop).astype(bool)
            text = jnp.where(drop[:, None, None], jnp.asarray(null_text, jnp.float32), text)
            first = jnp.arange(mask.shape[1]) == 0
            mask = jnp.where(drop[:, None], first[None, :], mask)
            pooled = jnp.where(drop[:, None], jnp.asarray(null_pooled, jnp.float32), pooled)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = Mlp(d, d, **kw, name="caption_projection")(text.astype(self.dtype))
        pooled = Mlp(d, d, activation=nn.silu, **kw, name="pooled_projection")(pooled.astype(self.dtype))
        return context, mask, pooled


def embed_text(module: nn.Module, text: Array, text_mask: Array, text_pooled: Array | None,
               force_drop_ids: Array | None, *, train: bool, packed: bool, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    """Per-example text -> cross-attention context and pooled conditions, with CFG text dropout.

    Call only inside an `@nn.compact` method of a DiT (creates `TextEmbedder` "text_embedder" of
    width `module.hidden_size`; drops text with `module.text_dropout_prob`, `cfg_drop`). text
    `(B, M, S, Dc)`, text_mask `(B, M, S)`, text_pooled `(B, M, Dc)` | None, force_drop_ids
    `(B, M)` | None: M examples per row (1 in a regular batch, the slots of a packed sequence).
    Returns `(context (B, M*S, D), context_mask (B, M*S), context_segment_ids (B, M*S) | None,
    pooled (B, M, D))`; with `packed` the context of slot j has segment id j + 1, so a packed
    token cross-attends only to its own example's text.
    """
    b, m, n_text = text.shape[:3]
    d = module.hidden_size
    drop = cfg_drop(module, (b, m), module.text_dropout_prob, train, force_drop_ids)
    flat = lambda a: None if a is None else a.reshape(b * m, *a.shape[2:])  # noqa: E731
    context, context_mask, pooled = TextEmbedder(d, dtype=dtype, param_dtype=param_dtype, name="text_embedder")(
        flat(text), flat(text_mask), flat(text_pooled), flat(drop))
    segment_ids = None
    if packed:
        segment_ids = jnp.broadcast_to(jnp.repeat(jnp.arange(1, m + 1, dtype=jnp.int32), n_text), (b, m * n_text))
    return context.reshape(b, m * n_text, d), context_mask.reshape(b, m * n_text), segment_ids, pooled.reshape(b, m, d)


class FinalLayer(nn.Module):
    """adaLN LayerNorm then Dense(D -> P), both zero-initialised (DiT `FinalLayer`).

    `(B, L, D), (B, D)` -> `(B, L, P)` float32, P = ph * pw * C_out. Per-token conditions: c
    `(B, G, D)` with `c_index (B, L)` (see `per_token`).
    """

    patch_values: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, c_index: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = modulations(c, 2, x.shape[-1], c_index, **kw)
        h = adaln_norm(x, shift, scale, dtype=self.dtype, name="norm")
        out = nn.Dense(self.patch_values, **kw, kernel_init=zeros((EMBED, None)), bias_init=zeros((None,)),
                       name="linear")(h)
        return out.astype(jnp.float32)
