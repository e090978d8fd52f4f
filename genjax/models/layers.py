"""Shared transformer layers: attention (segment-aware), MLP, norms, embeddings, (un)patchify.

Dimension letters, used in shapes and einsum strings across genjax/models:

  B  batch (examples)                  T  frames
  H  height (pixels, latents or patches) W  width
  C  channels                          L  tokens (query length)
  S  context tokens (key/value length in cross-attention)
  D  model width                       N  attention heads
  K  head dim (D = N * K)              P  values per patch (pt * ph * pw * C)

Arrays are channels-last: images `(B, H, W, C)`, videos `(B, T, H, W, C)`, tokens `(B, L, D)`.
Patch sizes are tuples in tensor-axis order, e.g. `(ph, pw)`.

Every module takes `dtype` (compute) and `param_dtype` (storage); layer norms, softmax and
timestep sinusoids compute in float32. Parameters carry logical axis names from
`genjax.parallel.axes` (`init` returns `nn.Partitioned` boxes; `apply` takes boxed or plain).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.parallel.axes import BATCH, CONV_IN, CONV_OUT, EMBED, HEADS, KV, LENGTH, MLP, NORM

Dtype = Any
Array = jax.Array

xavier_uniform = nn.initializers.xavier_uniform()


def _param(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(t: Array, dim: int, *, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0) -> Array:
    """Sinusoidal timestep embedding.

    `freqs[i] = exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))`, `args = t * freqs`,
    output `[cos(args), sin(args)]` if `flip_sin_to_cos` else `[sin, cos]`, zero-padded by one
    column if `dim` is odd.

    Args:
      t: `(B,)` timesteps, int or float (fractional allowed), typically in [0, 1000).
      dim: output width.
      max_period: the longest period, in units of t.
      flip_sin_to_cos: cos first (DiT, diffusers DiT / SD U-Net) or sin first.
      downscale_freq_shift: 0 in DiT (`TimestepEmbedder.timestep_embedding`) and SD; 1 in
        diffusers' `DiTTransformer2DModel` and DDPM.
      scale: multiplies `args`.

    Returns:
      `(B, dim)` float32, values in [-1, 1].

    Source: Vaswani et al. 2017 sec. 3.5; Peebles & Xie 2023 (DiT `models.py`); matches
      `diffusers.models.embeddings.get_timestep_embedding` (checked in tests).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = scale * jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    first, second = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate([first, second], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sincos_pos_embed_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos position embedding `[sin(pos * omega), cos(pos * omega)]`, omega_i = 10000^(-2i/D).

    Args:
      embed_dim: D, even.
      pos: positions, any shape with M values (flattened), float.

    Returns:
      `(M, D)` float64 numpy.

    Raises:
      UserError: `embed_dim` odd.

    Source: MAE `get_1d_sincos_pos_embed_from_grid` (He et al. 2022), used by DiT.
    """
    check(embed_dim % 2 == 0, "embed_dim", embed_dim, "must be even for sin-cos position embeddings")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, *, base_size: int | None = None,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """Fixed 2D sin-cos position embedding of a `grid_h x grid_w` patch grid, row-major tokens.

    The first D/2 columns encode the column (w) coordinate, the last D/2 the row (h) coordinate,
    as in MAE / DiT (whose `meshgrid(grid_w, grid_h)` puts w first). With `base_size`, coordinates
    are `arange(g) * base_size / g / interpolation_scale` (diffusers `PatchEmbed` when the input grid
    differs from the training grid); without it they are `arange(g)`.

    Args:
      embed_dim: D, divisible by 4.
      grid_h, grid_w: patch-grid size (non-square allowed).
      base_size: training grid side for diffusers-style position interpolation, or None.
      interpolation_scale: diffusers' `interpolation_scale`.

    Returns:
      `(grid_h * grid_w, D)` float32 numpy; token index = h * grid_w + w.

    Raises:
      UserError: `embed_dim` not divisible by 4.

    Source: MAE `get_2d_sincos_pos_embed` (He et al. 2022), DiT `models.py`; diffusers
      `get_2d_sincos_pos_embed` (checked in tests).
    """
    check(embed_dim % 4 == 0, "embed_dim", embed_dim, "must be divisible by 4 for 2D sin-cos positions")
    hs = np.arange(grid_h, dtype=np.float64)
    ws = np.arange(grid_w, dtype=np.float64)
    if base_size is not None:
        hs = hs / (grid_h / base_size) / interpolation_scale
        ws = ws / (grid_w / base_size) / interpolation_scale
    hh, ww = np.meshgrid(hs, ws, indexing="ij")  # (H, W) each
    emb = np.concatenate([sincos_pos_embed_1d(embed_dim // 2, ww), sincos_pos_embed_1d(embed_dim // 2, hh)], 1)
    return emb.astype(np.float32)


class TimestepEmbedder(nn.Module):
    """t -> sinusoid (float32) -> Dense -> SiLU -> Dense: `(B,)` -> `(B, D)`.

    Submodules `linear_1`, `linear_2` (diffusers `TimestepEmbedding` names). Weights init
    normal(0.02) as DiT. Source: DiT `TimestepEmbedder` (Peebles & Xie 2023).
    """

    features: int
    frequency_embedding_size: int = 256
    max_period: float = 10000.0
    flip_sin_to_cos: bool = True
    downscale_freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        freq = timestep_embedding(t, self.frequency_embedding_size, max_period=self.max_period,
                                  flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift)
        init = nn.initializers.normal(0.02)
        h = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_param(init, (None, MLP)), bias_init=_param(nn.initializers.zeros, (MLP,)),
                     name="linear_1")(freq)
        h = nn.silu(h)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_param(init, (MLP, EMBED)), bias_init=_param(nn.initializers.zeros, (EMBED,)),
                        name="linear_2")(h)


# --------------------------------------------------------------------------- basic layers


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, output in `dtype`.

    Params `scale`, `bias` (D,) with logical axis `norm` (absent if `use_scale`/`use_bias` False).
    Shapes: `(..., D)` -> `(..., D)`.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.LayerNorm(epsilon=self.epsilon, use_scale=self.use_scale, use_bias=self.use_bias,
                         dtype=jnp.float32, param_dtype=self.param_dtype,
                         scale_init=_param(nn.initializers.ones, (NORM,)),
                         bias_init=_param(nn.initializers.zeros, (NORM,)), name="norm")(x.astype(jnp.float32))
        return y.astype(self.dtype)


class Mlp(nn.Module):
    """Dense(D -> hidden) -> activation -> Dense(hidden -> out): `(..., D)` -> `(..., out)`.

    Submodules `fc1` (kernel axes `(embed, mlp)`), `fc2` (`(mlp, embed)`). The default activation
    is GELU with the tanh approximation, as DiT's `approx_gelu` and diffusers "gelu-approximate".
    Source: timm `Mlp` as used by DiT.
    """

    hidden_features: int
    out_features: int | None = None
    activation: Callable[[Array], Array] = functools.partial(nn.gelu, approximate=True)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.out_features or x.shape[-1]
        h = nn.Dense(self.hidden_features, use_bias=self.use_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, kernel_init=_param(xavier_uniform, (EMBED, MLP)),
                     bias_init=_param(nn.initializers.zeros, (MLP,)), name="fc1")(x)
        h = self.activation(h)
        return nn.Dense(out, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=_param(xavier_uniform, (MLP, EMBED)),
                        bias_init=_param(nn.initializers.zeros, (EMBED,)), name="fc2")(h)


# --------------------------------------------------------------------------- attention


def attention_mask(q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None, *,
                   kv_mask: Array | None = None, causal: bool = False,
                   q_len: int | None = None, kv_len: int | None = None) -> Array | None:
    """Boolean attention mask `(B|1, 1, L, S)`: True where query l may attend to key s.

    Args:
      q_segment_ids: `(B, L)` int, 0 = padding (a padding query attends to nothing).
      kv_segment_ids: `(B, S)` int, 0 = padding (a padding key is attended by nothing). With both,
        query l sees key s only if their ids are equal and nonzero (block-diagonal packing).
      kv_mask: `(B, S)` bool, False = key not attended.
      causal: query l sees keys s <= l (needs `q_len` and `kv_len`).

    Returns:
      The mask, or None when nothing is masked.

    Source: NaViT (Dehghani et al. 2023) sec. 2.2 "Patch n' Pack" masked self-attention.
    """
    mask = None

    def _and(a, b):
        return b if a is None else a & b

    if q_segment_ids is not None:
        mask = _and(mask, (q_segment_ids != 0)[:, None, :, None])
    if kv_segment_ids is not None:
        mask = _and(mask, (kv_segment_ids != 0)[:, None, None, :])
    if q_segment_ids is not None and kv_segment_ids is not None:
        mask = _and(mask, q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    if kv_mask is not None:
        mask = _and(mask, kv_mask.astype(bool)[:, None, None, :])
    if causal:
        mask = _and(mask, jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None])
    return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(K)) v with a boolean mask; softmax in float32.

    Args:
      q: `(B, L, N, K)`; k, v: `(B, S, N, K)`.
      mask: broadcastable to `(B, N, L, S)` bool, True = attend.

    Returns:
      `(B, L, N, K)` in q's dtype. A query row with no allowed key gives exactly 0 (not NaN), and
      masked keys get weight exactly 0, so a packed batch equals its examples run alone.

    Source: Vaswani et al. 2017 eq. 1.
    """
    logits = jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # fully-masked rows: uniform -> 0
    return jnp.einsum("bnls,bsnk->blnk", weights.astype(v.dtype), v)


class Attention(nn.Module):
    """Multi-head self- or cross-attention with q/k/v/out projections.

    Submodules `to_q`, `to_k`, `to_v` (DenseGeneral D -> (N, K), kernel axes `(embed, heads, kv)`)
    and `to_out` ((N, K) -> out, axes `(heads, kv, embed)`), diffusers `Attention` names.
    Init xavier-uniform as DiT.

    Attributes:
      num_heads: N. head_dim: K (default D // N).
      out_features: output width (default D of x). qkv_bias / out_bias: use biases.

    Source: Vaswani et al. 2017; diffusers `Attention` / DiT's timm `Attention` (same math).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, *, segment_ids: Array | None = None,
                 context_segment_ids: Array | None = None, context_mask: Array | None = None,
                 causal: bool = False) -> Array:
        """Attend from x to itself (context None) or to context.

        Args:
          x: `(B, L, D)` queries' tokens.
          context: `(B, S, Dc)` keys'/values' tokens, or None for self-attention.
          segment_ids: `(B, L)` int32, 0 = padding; in self-attention tokens attend only within
            their segment, padding neither attends nor is attended. Its rows give 0 before `to_out`
            (the output there is `to_out`'s bias).
          context_segment_ids: `(B, S)` int32 for packed cross-attention (query segment must match).
          context_mask: `(B, S)` bool, False = context token ignored.
          causal: query l attends to keys <= l.

        Returns:
          `(B, L, out_features or D)` in `dtype`.

        Raises:
          UserError: head_dim missing and D not divisible by num_heads; mask shapes wrong.
        """
        d = x.shape[-1]
        check(self.head_dim is not None or d % self.num_heads == 0, "num_heads", self.num_heads,
              f"must divide the width D={d} (or give head_dim)")
        k_dim = self.head_dim or d // self.num_heads
        b, l = x.shape[:2]
        kv_in = x if context is None else context
        s = kv_in.shape[1]
        if segment_ids is not None:
            check(segment_ids.shape == (b, l), "segment_ids.shape", segment_ids.shape, f"must be (B, L)={(b, l)}")
        if context_mask is not None:
            check(context_mask.shape == (b, s), "context_mask.shape", context_mask.shape, f"must be (B, S)={(b, s)}")
        if context_segment_ids is not None:
            check(context_segment_ids.shape == (b, s), "context_segment_ids.shape", context_segment_ids.shape,
                  f"must be (B, S)={(b, s)}")

        def proj(name, inp):
            return nn.DenseGeneral((self.num_heads, k_dim), use_bias=self.qkv_bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   kernel_init=_param(xavier_uniform, (EMBED, HEADS, KV)),
                                   bias_init=_param(nn.initializers.zeros, (HEADS, KV)), name=name)(inp)

        q, k, v = proj("to_q", x), proj("to_k", kv_in), proj("to_v", kv_in)
        kv_segments = segment_ids if context is None else context_segment_ids
        mask = attention_mask(segment_ids, kv_segments, kv_mask=context_mask, causal=causal, q_len=l, kv_len=s)
        out = dot_product_attention(q, k, v, mask)
        return nn.DenseGeneral(self.out_features or d, axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype,
                               param_dtype=self.param_dtype, kernel_init=_param(xavier_uniform, (HEADS, KV, EMBED)),
                               bias_init=_param(nn.initializers.zeros, (EMBED,)), name="to_out")(out)


# --------------------------------------------------------------------------- patches


def patchify(x: Array, patch_size: tuple[int, int]) -> Array:
    """`(B, H, W, C)` -> `(B, (H/ph)*(W/pw), ph*pw*C)`; tokens row-major, values ordered (ph, pw, C).

    Raises:
      UserError: H or W not divisible by the patch size.

    Source: DiT `unpatchify` (`nhwpqc->nchpwq`), in channels-last form.
    """
    ph, pw = patch_size
    check(x.shape[1] % ph == 0 and x.shape[2] % pw == 0, "image (H, W)", tuple(x.shape[1:3]),
          f"must be divisible by the patch size {(ph, pw)}")
    return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=ph, q=pw)


def unpatchify(tokens: Array, grid: tuple[int, int], patch_size: tuple[int, int]) -> Array:
    """Inverse of `patchify`: `(B, h*w, ph*pw*C)` with `grid = (h, w)` -> `(B, h*ph, w*pw, C)`.

    Raises:
      UserError: token count or width inconsistent with grid and patch size.
    """
    (h, w), (ph, pw) = grid, patch_size
    check(tokens.shape[1] == h * w, "tokens.shape[1]", tokens.shape[1], f"must equal grid h*w={h * w}")
    check(tokens.shape[2] % (ph * pw) == 0, "tokens.shape[2]", tokens.shape[2], f"must be divisible by {ph * pw}")
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=ph, q=pw)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv with kernel = stride = patch, `(B, H, W, C)` -> `(B, L, D)`.

    Submodule `proj` is an `nn.Conv` (kernel `(ph, pw, C, D)`, axes `(None, None, conv_in, conv_out)`)
    — diffusers `PatchEmbed.proj` (torch `(D, C, ph, pw)`) transposed. Tokens row-major over the
    `(H/ph, W/pw)` grid. Init xavier-uniform over the flattened `(ph*pw*C, D)` kernel, as DiT.

    Raises:
      UserError: H or W not divisible by the patch size.
    """

    features: int
    patch_size: tuple[int, int] = (2, 2)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.patch_size
        check(x.shape[1] % ph == 0 and x.shape[2] % pw == 0, "image (H, W)", tuple(x.shape[1:3]),
              f"must be divisible by the patch size {(ph, pw)}")
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        y = nn.Conv(self.features, (ph, pw), strides=(ph, pw), padding="VALID", use_bias=self.use_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_param(init, (None, None, CONV_IN, CONV_OUT)),
                    bias_init=_param(nn.initializers.zeros, (CONV_OUT,)), name="proj")(x)
        y = einops.rearrange(y, "b h w d -> b (h w) d")
        return nn.with_logical_constraint(y, (BATCH, LENGTH, None))
