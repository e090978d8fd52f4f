"""Attention: the one `dot_product_attention`, its masks, and the `Attention` layer every model uses.

Dimension letters are defined in `genjax.models.layers` (B batch, L query tokens, S key tokens,
D width, N heads, K head dim). `dot_product_attention` takes a `backend`; today only the dense
reference "xla" exists (logits in float32, an `(B, N, L, S)` array); memory-linear and fused
kernels go behind the same signature.

  Attention (DiT, video DiT, ViViT, CLIP, PixArt-style cross-attention, conv attention blocks)
    q = to_q(x), k = to_k(context or x), v = to_v(context or x)        (B, L|S, N, K)
    mask = attention_mask(segment ids, key mask, causal)               (B|1, 1, L, S) bool
    o = dot_product_attention(q, k, v, mask)                           (B, L, N, K)
    out = to_out(o)                                                    (B, L, D_out)

`factorised_attention` runs an attention layer spatially (tokens of one frame) or temporally
(tokens at one (h, w)) over (t, h, w)-ordered spacetime tokens, on regular grids by reshaping and
on packed sequences through group ids used as segment ids (ViViT model 3, video DiT).
"""

from __future__ import annotations

from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.layers import logical, xavier_uniform, zeros
from genjax.parallel.axes import EMBED, HEADS, KV

Dtype = Any
Array = jax.Array

BACKENDS = ("xla",)


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


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
                          backend: str = "xla") -> Array:
    """softmax(q k^T / sqrt(K)) v with a boolean mask; logits and softmax in float32.

    Args:
      q: `(B, L, N, K)`; k, v: `(B, S, N, K)`, any float dtype.
      mask: broadcastable to `(B, N, L, S)` bool, True = attend.
      backend: "xla", the dense reference (materialises the `(B, N, L, S)` logits).

    Returns:
      `(B, L, N, K)` in v's dtype. A query row with no allowed key gives exactly 0 (not NaN), and
      masked keys get weight exactly 0, so a packed batch equals its examples run alone.

    Raises:
      UserError: an unknown backend.

    Source: Vaswani et al. 2017 eq. 1.
    """
    check(backend in BACKENDS, "backend", backend, f"must be one of {BACKENDS}")
    logits = jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # fully-masked rows: uniform -> 0
    return jnp.einsum("bnls,bsnk->blnk", weights.astype(v.dtype), v)


class HeadsDense(nn.Module):
    """`nn.DenseGeneral` contracting the last `in_axes` input axes into `features`, with its kernel
    created at its final shape `(*in, *features)`: its logical axis names then describe the real
    axes, so the sharding constraint a boxed parameter implies under a mesh applies (flax's
    DenseGeneral initialises a flattened 2-D kernel, which a 3-name logical box rejects there).
    The initialiser sees the flattened `(fan_in, fan_out)` shape, as in DenseGeneral, so
    parameters and outputs are the same numbers.

    Params: `kernel (*in, *features)` with `kernel_names`, `bias features` with `bias_names`.
    """

    features: tuple[int, ...]
    kernel_names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...]
    in_axes: int = 1
    use_bias: bool = True
    kernel_init: Callable = xavier_uniform
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.in_axes:]
        flat = (int(np.prod(in_shape)), int(np.prod(self.features)))

        def init(rng, shape, dtype):
            return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

        kernel = self.param("kernel", logical(init, self.kernel_names), (*in_shape, *self.features),
                            self.param_dtype)
        bias = self.param("bias", zeros(self.bias_names), self.features, self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias


class Attention(nn.Module):
    """Multi-head self- or cross-attention with q/k/v/out projections: `(B, L, D)` -> `(B, L, D_out)`.

    Submodules `to_q`, `to_k`, `to_v` (DenseGeneral D -> (N, K), kernel axes `(embed, heads, kv)`)
    and `to_out` ((N, K) -> D_out, axes `(heads, kv, embed)`), diffusers `Attention` names.
    Init xavier-uniform as DiT, biases zero.

    Attributes:
      num_heads: N. head_dim: K (default D // N).
      out_features: D_out (default D of x). qkv_bias / out_bias: use biases.
      zero_init_out: zero-initialise `to_out` (kernel and bias), so a fresh layer outputs 0 and a
        residual branch through it starts as the identity (PixArt-alpha `initialize_weights`
        zeroes `cross_attn.proj`; Open-Sora STDiT).
      backend: `dot_product_attention`'s backend.

    Source: Vaswani et al. 2017; diffusers `Attention` / DiT's timm `Attention` (same math, tested
      against diffusers in tests/models/test_attention.py).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    zero_init_out: bool = False
    backend: str = "xla"
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
          context_mask: `(B, S)` bool, False = key (context token, or token in self-attention)
            ignored: exactly zero weight, equal to slicing those keys away.
          causal: query l attends to keys <= l.

        Returns:
          `(B, L, out_features or D)` in `dtype`.

        Raises:
          UserError: head_dim missing and D not divisible by num_heads; mask shapes wrong;
            unknown backend.
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
            return HeadsDense((self.num_heads, k_dim), (EMBED, HEADS, KV), (HEADS, KV), use_bias=self.qkv_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)(inp)

        q, k, v = proj("to_q", x), proj("to_k", kv_in), proj("to_v", kv_in)
        kv_segments = segment_ids if context is None else context_segment_ids
        mask = attention_mask(segment_ids, kv_segments, kv_mask=context_mask, causal=causal, q_len=l, kv_len=s)
        out = dot_product_attention(q, k, v, mask, backend=self.backend)
        out_init = nn.initializers.zeros if self.zero_init_out else xavier_uniform
        return HeadsDense((self.out_features or d,), (HEADS, KV, EMBED), (EMBED,), in_axes=2, use_bias=self.out_bias,
                          kernel_init=out_init, dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)


FACTORISED_AXES = ("spatial", "temporal")


def factorised_attention(attn: Callable[..., Array], x: Array, axis: str, *, grid: tuple[int, int, int] | None = None,
                         group_ids: Array | None = None) -> Array:
    """Run `attn` over one axis of spacetime tokens: within a frame ("spatial") or at one (h, w) ("temporal").

    Args:
      attn: an `Attention` (called as `attn(tokens)` or `attn(tokens, segment_ids=ids)`).
      x: `(B, L, D)` tokens in (t, h, w) row-major order.
      axis: "spatial" or "temporal".
      grid: `(nt, nh, nw)` of a regular video (L = nt*nh*nw): the tokens are reshaped to
        `(B*nt, nh*nw, D)` (spatial) or `(B*nh*nw, nt, D)` (temporal), attended, and put back.
      group_ids: `(B, L)` int32 for packed sequences (grid None), `spacetime.group_ids` of (segment, t)
        for spatial or (segment, h, w) for temporal, used as attention segment ids.

    Returns:
      `(B, L, D_out)`; both forms give the same numbers on the same tokens.

    Raises:
      UserError: unknown axis, or neither / both of grid and group_ids.

    Source: ViViT (Arnab et al. 2021) sec. 3.3 model 3, eqs. 7-9; NaViT-style segment masks for
      the packed form.
    """
    check(axis in FACTORISED_AXES, "axis", axis, f"must be one of {FACTORISED_AXES}")
    check((grid is None) != (group_ids is None), "grid", grid, "give exactly one of grid or group_ids")
    if grid is None:
        return attn(x, segment_ids=group_ids)
    groups = "(b t) s d" if axis == "spatial" else "(b s) t d"  # one attention per group
    h = einops.rearrange(x, f"b (t s) d -> {groups}", t=grid[0])
    return einops.rearrange(attn(h), f"{groups} -> b (t s) d", b=x.shape[0])
