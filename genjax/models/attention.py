"""Attention: the one `dot_product_attention`, its masks, and the `Attention` layer every model uses.

Dimension letters are defined in `genjax.models.layers` (B batch, L query tokens, S key tokens,
D width, N heads, K head dim). `dot_product_attention` takes an `implementation`: the dense
reference "xla" (float32 logits, an `(B, N, L, S)` array), the memory-linear "blockwise"
(`blockwise_attention.py`, every platform), the fused "cudnn" and "pallas" kernels, or "auto". Masks
go in as their ingredients (segment ids, key mask, causality), never as an `(L, S)` array, so the
memory-linear paths build none; every model's `attention_impl` attribute chooses.

Sequence parallelism: under a mesh whose `context` axis has size c > 1 (config `mesh.context`),
`dot_product_attention` splits the tokens over it (`genjax.parallel.context`): self-attention as
ring attention (blockwise steps merged by log-sum-exp) or DeepSpeed-Ulysses (all-to-all to N / c
heads), by `mesh.context_parallel`; cross-attention to un-split text is local. c = 1: none of it.

  Attention (DiT, video DiT, ViViT, CLIP, PixArt-style cross-attention, conv attention blocks)
    q = to_q(x), k = to_k(context or x), v = to_v(context or x)        (B, L|S, N, K), + 3D RoPE
    o = dot_product_attention(q, k, v, segment ids, key mask, causal)  (B, L, N, K)
    out = to_out(o)                                                    (B, L, D_out)

`factorised_attention` runs an attention layer spatially (one frame) or temporally (one (h, w)) over
(t, h, w)-ordered tokens: regular grids by reshaping, packed ones by group ids as segment ids.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.blockwise_attention import blockwise_attention
from genjax.models.layers import HeadsDense, HeadsRMSNorm, xavier_uniform
from genjax.models.spacetime import apply_rope
from genjax.parallel import context as context_lib
from genjax.parallel.axes import EMBED, HEADS, KV

Dtype = Any
Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "pallas")
QK_NORMS = (None, "rms_norm_across_heads")
AUTO_DENSE_MAX = 1024 * 1024  # auto on CPU: dense up to 1k x 1k (blockwise: 0.63x its step at 1k)


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


def segment_ids_of(q: Array, k: Array, q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
                   kv_mask: Array | None = None) -> tuple[Array, Array]:
    """The mask ingredients as one pair of `(B, L)`, `(B, S)` int32 ids with `attention_mask`'s meaning
    under the single rule "equal and nonzero": missing ids become ones, a lone id array becomes
    `id != 0`, and a key mask is folded into the key ids as 0."""
    b, l, s = q.shape[0], q.shape[1], k.shape[1]
    if q_segment_ids is not None and kv_segment_ids is not None:
        qi, ki = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
    else:
        qi = jnp.ones((b, l), jnp.int32) if q_segment_ids is None else (q_segment_ids != 0).astype(jnp.int32)
        ki = jnp.ones((b, s), jnp.int32) if kv_segment_ids is None else (kv_segment_ids != 0).astype(jnp.int32)
    if kv_mask is not None:
        ki = jnp.where(kv_mask.astype(bool), ki, 0)
    return qi, ki


def _platform() -> str:
    return jax.devices()[0].platform


def resolve_implementation(implementation: str, *, platform: str, q_len: int, kv_len: int,
                           packed: bool, key_mask: bool, self_attention: bool, dense_mask: bool = False) -> str:
    """The implementation `dot_product_attention` runs: `implementation` itself, or for "auto" by
    platform and shape. "auto" rules:
      gpu: "cudnn" when nothing is packed (cuDNN flash attention; key masks as a (B, 1, 1, S) mask),
           else "pallas" for packed self-attention without a separate key mask, else "blockwise";
      tpu: "pallas" (the Pallas TPU flash kernel, segment ids);
      cpu and others: "xla" while L * S <= AUTO_DENSE_MAX, else "blockwise";
      any platform with an explicit `(L, S)` mask (`dense_mask`): "xla", the only one taking it.

    Raises:
      UserError: an unknown implementation, or "cudnn" / "pallas" asked for a mask form or a
        platform they do not support (the message names the one that does); an explicit mask
        with an implementation other than "xla" / "auto".
    """
    check(implementation in IMPLEMENTATIONS, "attention_impl", implementation, f"must be one of {IMPLEMENTATIONS}")
    if dense_mask:
        check(implementation in ("auto", "xla"), "attention_impl", implementation,
              "does not take an explicit (L, S) attention mask; use 'xla' (or 'auto')")
        return "xla"
    if implementation == "auto":
        if platform == "gpu":
            if not packed:
                return "cudnn"
            return "pallas" if self_attention and not key_mask else "blockwise"
        if platform == "tpu":
            return "pallas"
        return "xla" if q_len * kv_len <= AUTO_DENSE_MAX else "blockwise"
    if implementation == "cudnn":
        check(platform == "gpu", "attention_impl", "cudnn",
              f"needs an NVIDIA GPU (platform is {platform}); use 'blockwise'")
        check(not packed, "attention_impl", "cudnn",
              "does not take segment ids (packed sequences); use 'pallas' or 'blockwise'")
    if implementation == "pallas":
        check(platform in ("gpu", "tpu"), "attention_impl", "pallas",
              f"needs a GPU or TPU (platform is {platform}); use 'blockwise'")
        check(platform == "tpu" or (self_attention and not key_mask), "attention_impl", "pallas",
              "on GPU takes self-attention with segment ids only (no cross-attention, no key mask); use 'blockwise'")
    return implementation


def describe_implementation(implementation: str, platform: str) -> str:
    """One line saying what `implementation` runs on `platform`, for start-up logs.

    Raises:
      UserError: an unknown implementation.
    """
    check(implementation in IMPLEMENTATIONS, "attention_impl", implementation, f"must be one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return f"attention_impl={implementation} on {platform}"
    rule = {"gpu": "cudnn, or pallas / blockwise for packed sequences", "tpu": "pallas (flash, segment ids)"}.get(
        platform, f"xla while L*S <= {AUTO_DENSE_MAX:,}, else blockwise")
    return f"attention_impl=auto on {platform}: {rule}"


def _cudnn(q, k, v, kv_mask, causal):
    mask = None if kv_mask is None else kv_mask.astype(bool)[:, None, None, :]
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
    if kv_mask is not None:  # a row with no key gives 0, as the other implementations
        o = jnp.where(jnp.any(kv_mask, -1)[:, None, None, None], o, 0)
    return o


def pallas_attention(q: Array, k: Array, v: Array, q_ids: Array, kv_ids: Array, *, causal: bool,
                     platform: str) -> Array:
    """JAX's Pallas flash kernels with segment ids (ids as `segment_ids_of`): TPU `flash_attention`,
    GPU (Triton) `mha` (self-attention, q_ids is kv_ids; in Pallas interpret mode off-GPU, for tests).
    Padding queries (id 0) give 0."""
    scale = 1.0 / float(np.sqrt(q.shape[-1]))
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu

        o = tpu.flash_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), segment_ids=tpu.SegmentIds(q_ids, kv_ids),
                                causal=causal, sm_scale=scale)
        o = jnp.swapaxes(o, 1, 2)
    else:
        from jax.experimental.pallas.ops.gpu import attention as gpu

        o = gpu.mha(q, k, v, q_ids, sm_scale=scale, causal=causal, interpret=platform != "gpu")
    return jnp.where((q_ids != 0)[:, :, None, None], o, 0).astype(v.dtype)  # padding queries: 0


def _local_attention(q: Array, k: Array, v: Array, q_segment_ids: Array | None, kv_segment_ids: Array | None,
                     kv_mask: Array | None, *, causal: bool, implementation: str, mask: Array | None = None) -> Array:
    """`dot_product_attention` on arrays one device holds whole ("auto" resolved for these shapes)."""
    packed = q_segment_ids is not None or kv_segment_ids is not None
    impl = resolve_implementation(implementation, platform=_platform(), q_len=q.shape[1], kv_len=k.shape[1],
                                  packed=packed, key_mask=kv_mask is not None,
                                  self_attention=q_segment_ids is not None and kv_segment_ids is q_segment_ids,
                                  dense_mask=mask is not None)
    if impl == "cudnn":
        return _cudnn(q, k, v, kv_mask, causal)
    if impl in ("blockwise", "pallas"):
        q_ids, kv_ids = segment_ids_of(q, k, q_segment_ids, kv_segment_ids, kv_mask)
        if impl == "pallas":
            return pallas_attention(q, k, v, q_ids, kv_ids, causal=causal, platform=_platform())
        return blockwise_attention(q, k, v, q_ids, kv_ids, causal=causal)[0]
    given = mask
    mask = attention_mask(q_segment_ids, kv_segment_ids, kv_mask=kv_mask, causal=causal,
                          q_len=q.shape[1], kv_len=k.shape[1])
    if given is not None:
        mask = given.astype(bool) if mask is None else mask & given.astype(bool)
    logits = jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)  # fully-masked rows: uniform -> 0
    return jnp.einsum("bnls,bsnk->blnk", weights.astype(v.dtype), v)


def _sequence_parallel(q, k, v, q_segment_ids, kv_segment_ids, kv_mask, causal, implementation,
                       self_attention) -> Array | None:
    """`dot_product_attention` split over the mesh's `context` axis, or None where it does not apply
    (no such axis, or token counts it does not divide: then GSPMD gathers what it needs)."""
    c = context_lib.context_size()
    l, s = q.shape[1], k.shape[1]
    if c == 1 or l % c:
        return None
    local = functools.partial(_local_attention, causal=causal, implementation=implementation)
    masks = (q_segment_ids, kv_segment_ids, kv_mask)
    if not (l == s if self_attention is None else self_attention) and not causal:
        return context_lib.local_query_attention(local, q, k, v, *masks)  # keys not split: text tokens
    if s % c:
        return None
    if context_lib.current_strategy() == "ulysses":
        return context_lib.ulysses_attention(local, q, k, v, *masks)
    q_ids, kv_ids = segment_ids_of(q, k, *masks)

    def local_lse(q, k, v, q_ids, kv_ids, q_positions, kv_positions):
        return blockwise_attention(q, k, v, q_ids, kv_ids, causal=causal, q_positions=q_positions,
                                   kv_positions=kv_positions)

    return context_lib.ring_attention(local_lse, q, k, v, q_ids, kv_ids)[0]


def dot_product_attention(q: Array, k: Array, v: Array, *, q_segment_ids: Array | None = None,
                          kv_segment_ids: Array | None = None, kv_mask: Array | None = None, causal: bool = False,
                          implementation: str = "auto", self_attention: bool | None = None,
                          mask: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(K)) v with packed-segment, key, causal and explicit masks; softmax in float32.

    Args:
      q: `(B, L, N, K)`; k, v: `(B, S, N, K)`, any float dtype.
      q_segment_ids, kv_segment_ids, kv_mask, causal: the mask, as in `attention_mask` (query l
        sees key s iff both ids are nonzero, equal when both are given, the key is not masked, and
        s <= l when causal).
      implementation: "xla" the dense reference (materialises `(B, N, L, S)` float32 logits);
        "blockwise" memory-linear on every platform (`blockwise_attention`, block pairs that
        cannot meet skipped); "cudnn" `jax.nn.dot_product_attention` on NVIDIA GPUs (no segment
        ids); "pallas" JAX's Pallas flash kernels with segment ids (TPU; GPU self-attention);
        "auto" by platform and shape (`resolve_implementation`; under sequence parallelism by
        the shape each device attends over).
      self_attention: whether k, v are the queries' own tokens (split over the mesh's `context`
        axis like q) rather than another sequence held whole (text tokens); None: L == S.
      mask: an explicit boolean mask broadcastable to `(B, N, L, S)`, True = query l may attend
        to key s, and-ed with the others (e.g. VAR's block-causal mask over scales). Taken only by
        "xla" ("auto" picks it; the other implementations refuse it) and never split over a
        `context` axis.

    Sequence parallelism: traced under a mesh (`jax.set_mesh`) with a `context` axis of size
    c > 1 (`genjax.parallel.context`), and L divisible by c, attention runs in a `jax.shard_map`
    with batch over (data, fsdp), tokens over context and heads over tensor:
      self-attention (and any causal call; S divisible by c) by the strategy of the enclosing
        `context.strategy(...)` (config `mesh.context_parallel`): "ring" (default; ring attention,
        each step a `blockwise_attention` with global positions, whatever `implementation` says)
        or "ulysses" (all-to-all to whole sequences over N / c heads, then this function's
        `implementation` on each device);
      cross-attention (self_attention False, not causal): each device attends its L / c queries
        to all S keys (`context.local_query_attention`), no communication.
    Otherwise (c = 1, no mesh, or L or S not divisible by c) it runs as written, on one program
    that XLA partitions.

    Returns:
      `(B, L, N, K)` in v's dtype. A query row with no allowed key gives exactly 0 (not NaN), and
      masked keys get weight exactly 0, so a packed batch equals its examples run alone. All
      implementations, and the ring and Ulysses forms, equal "xla" to 1e-5 in float32, forward and
      gradient (tested; cudnn and pallas on their platforms).

    Raises:
      UserError: an unknown implementation, or one that does not support the platform or mask;
        Ulysses with heads (per tensor shard) not divisible by the context size.

    Source: Vaswani et al. 2017 eq. 1; blockwise: Rabe & Staats 2021, Dao et al. 2022; sequence
    parallelism: Liu et al. 2023 (ring), Jacobs et al. 2023 (Ulysses).
    """
    if mask is None:
        out = _sequence_parallel(q, k, v, q_segment_ids, kv_segment_ids, kv_mask, causal, implementation,
                                 self_attention)
        if out is not None:
            return out
    return _local_attention(q, k, v, q_segment_ids, kv_segment_ids, kv_mask, causal=causal,
                            implementation=implementation, mask=mask)


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
      attention_impl: `dot_product_attention`'s implementation ("auto", "xla", "blockwise",
        "cudnn", "pallas").
      qk_norm: None, or "rms_norm_across_heads": `HeadsRMSNorm` submodules `norm_q` / `norm_k`
        (eps `qk_norm_eps`) on the projected queries and keys, before RoPE (Wan 2.1, diffusers
        `WanAttention.norm_q` / `norm_k`; tested against it in tests/models/test_wan.py).

    Source: Vaswani et al. 2017; diffusers `Attention` / DiT's timm `Attention` (same math, tested
      against diffusers in tests/models/test_attention.py).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    qkv_bias: bool = True
    out_bias: bool = True
    zero_init_out: bool = False
    attention_impl: str = "auto"
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, *, segment_ids: Array | None = None,
                 context_segment_ids: Array | None = None, context_mask: Array | None = None,
                 causal: bool = False, rope: Array | None = None, mask: Array | None = None) -> Array:
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
          rope: `(B, L, K/2)` rotary angles of the tokens (self-attention; `spacetime.rope_angles`),
            applied to queries and keys (`spacetime.apply_rope`).
          mask: explicit boolean mask broadcastable to `(B, N, L, S)`, True = may attend
            (`dot_product_attention`'s `mask`; "xla" / "auto" only).

        Returns:
          `(B, L, out_features or D)` in `dtype`.

        Raises:
          UserError: head_dim missing and D not divisible by num_heads; mask shapes wrong;
            unknown or unsupported attention_impl; unknown qk_norm.
        """
        check(self.qk_norm in QK_NORMS, "qk_norm", self.qk_norm, f"must be one of {QK_NORMS}")
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
        if self.qk_norm is not None:
            kw = dict(epsilon=self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q, k = HeadsRMSNorm(**kw, name="norm_q")(q), HeadsRMSNorm(**kw, name="norm_k")(k)
        if rope is not None:
            check(context is None, "rope", "given", "is for self-attention")
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        kv_segments = segment_ids if context is None else context_segment_ids
        out = dot_product_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segments,
                                    kv_mask=context_mask, causal=causal, implementation=self.attention_impl,
                                    self_attention=context is None, mask=mask)
        out_init = nn.initializers.zeros if self.zero_init_out else xavier_uniform
        return HeadsDense((self.out_features or d,), (HEADS, KV, EMBED), (EMBED,), in_axes=2, use_bias=self.out_bias,
                          kernel_init=out_init, dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)


FACTORISED_AXES = ("spatial", "temporal")


def factorised_attention(attn: Callable[..., Array], x: Array, axis: str, *, grid: tuple[int, int, int] | None = None,
                         group_ids: Array | None = None, rope: Array | None = None) -> Array:
    """Run `attn` over one axis of spacetime tokens: within a frame ("spatial") or at one (h, w) ("temporal").

    Args:
      attn: an `Attention` (called as `attn(tokens, rope=...)` or `attn(tokens, segment_ids=ids, rope=...)`).
      x: `(B, L, D)` tokens in (t, h, w) row-major order.
      axis: "spatial" or "temporal".
      grid: `(nt, nh, nw)` of a regular video (L = nt*nh*nw): the tokens are reshaped to
        `(B*nt, nh*nw, D)` (spatial) or `(B*nh*nw, nt, D)` (temporal), attended, and put back.
      group_ids: `(B, L)` int32 for packed sequences (grid None), `spacetime.group_ids` of (segment, t)
        for spatial or (segment, h, w) for temporal: the tokens are sorted by group id (so each
        group is contiguous and the memory-linear implementations skip the block pairs of
        different groups), attended with the sorted ids as segment ids, and put back in place.
      rope: `(B, L, K/2)` rotary angles of x's tokens, moved with them (`Attention`'s rope).

    Returns:
      `(B, L, D_out)`; both forms give the same numbers on the same tokens.

    Raises:
      UserError: unknown axis, or neither / both of grid and group_ids.

    Source: ViViT (Arnab et al. 2021) sec. 3.3 model 3, eqs. 7-9; NaViT-style segment masks for
      the packed form.
    """
    check(axis in FACTORISED_AXES, "axis", axis, f"must be one of {FACTORISED_AXES}")
    check((grid is None) != (group_ids is None), "grid", grid, "give exactly one of grid or group_ids")
    if grid is None:  # sort tokens so each group is contiguous: block-sparse attention skips the rest
        order = jnp.argsort(group_ids, axis=1, stable=True)
        move = lambda a: None if a is None else jnp.take_along_axis(a, order[..., None], 1)  # noqa: E731
        out = attn(move(x), segment_ids=jnp.take_along_axis(group_ids, order, 1), rope=move(rope))
        return jnp.take_along_axis(out, jnp.argsort(order, axis=1)[..., None], 1)
    groups = "(b t) s d" if axis == "spatial" else "(b s) t d"  # one attention per group
    regroup = lambda a: None if a is None else einops.rearrange(a, f"b (t s) d -> {groups}", t=grid[0])  # noqa: E731
    return einops.rearrange(attn(regroup(x), rope=regroup(rope)), f"{groups} -> b (t s) d", b=x.shape[0])
