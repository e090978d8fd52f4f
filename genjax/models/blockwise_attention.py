"""Memory-linear attention: blockwise softmax(q k^T / sqrt(K)) v with an online softmax and a
hand-written backward, on every platform (CPU included).

Queries are cut into blocks of `block_q` tokens and keys into blocks of `block_k`; one block pair
at a time builds its `(B, N, block_q, block_k)` logits, its mask (from the blocks' segment ids and
positions, never from an `(L, S)` array) and an online-softmax update (running max, sum and
output, Milakov & Gimelshein 2018). The backward recomputes each block's probabilities from the
saved log-sum-exp, as FlashAttention-2 does, so neither pass keeps anything of size L x S.

Block pairs that cannot meet are skipped, as splash attention does: a pair runs only when, in
some batch row, the two blocks' ranges of nonzero segment ids overlap (and, with causality, some
query position is >= some key position). Packed sequences whose segments are contiguous
(`data.packing` numbers them 1..k left to right) then cost about the sum of their examples'
squares instead of L squared. Ids that are not contiguous stay correct, only less is skipped.

Mask semantics (the same as `attention.attention_mask`, checked against it in the tests): query
l attends to key s iff `q_segment_ids[l] == kv_segment_ids[s] != 0` and, when causal,
`q_positions[l] >= kv_positions[s]`. A query with no key gets output 0 and log-sum-exp
`EMPTY_LSE`; its gradient is 0.

Source: Rabe & Staats 2021 "Self-attention does not need O(n^2) memory"; Dao et al. 2022
FlashAttention (alg. 1-2, forward and backward with the log-sum-exp residual); Dao 2023
FlashAttention-2 (the backward's D = rowsum(dO * O)); splash attention's block-sparse skipping
(jax.experimental.pallas.ops.tpu.splash_attention).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array

EMPTY_LSE = -1e30  # log-sum-exp of a query row with no key (finite, so merges stay NaN-free)
_MASKED = float(jnp.finfo(jnp.float32).min)


def _pad(x: Array, axis: int, size: int, value) -> Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _block_ranges(ids: Array, pos: Array, block: int) -> tuple[Array, Array, Array, Array]:
    """Per block: min / max nonzero segment id `(B, n)` (empty block: min > max) and min / max position `(n,)`."""
    b, n = ids.shape[0], ids.shape[1] // block
    blk = ids.reshape(b, n, block)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(blk != 0, blk, big), axis=-1)
    hi = jnp.max(blk, axis=-1)
    p = pos.reshape(n, block)
    return lo, hi, p.min(-1), p.max(-1)


def block_schedule(q_ids: Array, kv_ids: Array, q_pos: Array, kv_pos: Array, block_q: int, block_k: int,
                   causal: bool) -> Array:
    """Which block pairs can meet: `(n_q, n_k)` bool (True = compute), from padded ids and positions."""
    qlo, qhi, qpmin, qpmax = _block_ranges(q_ids, q_pos, block_q)
    klo, khi, kpmin, kpmax = _block_ranges(kv_ids, kv_pos, block_k)
    meet = (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
    active = jnp.any(meet, axis=0)
    if causal:
        active &= qpmax[:, None] >= kpmin[None, :]
    return active


def _schedule_lists(active: Array) -> tuple[Array, Array]:
    """Active column indices of each row first (stable), and their count: `(n, m)`, `(n,)`."""
    order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
    return order, active.sum(-1).astype(jnp.int32)


def _block_mask(q_ids, kv_ids, q_pos, kv_pos, causal):
    """`(B, 1, bq, bk)` bool for one block pair."""
    mask = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids != 0)[:, :, None]
    if causal:
        mask &= (q_pos[:, None] >= kv_pos[None, :])[None]
    return mask[:, None]


def _slice(x: Array, start, size: int, axis: int = 1) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _logits(qi, kj, scale):
    return jnp.einsum("bqnk,bsnk->bnqs", qi, kj, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, q_ids, kv_ids, q_pos, kv_pos, causal, block_q, block_k):
    """Padded inputs -> `o (B, L, N, Kv)` in v's dtype, `lse (B, N, L)` float32."""
    b, lq, n, _ = q.shape
    kv_dim = v.shape[-1]
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    order, count = _schedule_lists(block_schedule(q_ids, kv_ids, q_pos, kv_pos, block_q, block_k, causal))

    def q_block(i, outputs):
        start = i * block_q
        qi, qid, qp = _slice(q, start, block_q), _slice(q_ids, start, block_q), _slice(q_pos, start, block_q, 0)

        def step(t, carry):
            m, l, acc = carry
            ks = order[i, t] * block_k
            kj, vj = _slice(k, ks, block_k), _slice(v, ks, block_k)
            mask = _block_mask(qid, _slice(kv_ids, ks, block_k), qp, _slice(kv_pos, ks, block_k, 0), causal)
            s = jnp.where(mask, _logits(qi, kj, scale), _MASKED)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bnqs,bsnk->bnqk", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((b, n, block_q), _MASKED, jnp.float32), jnp.zeros((b, n, block_q), jnp.float32),
                jnp.zeros((b, n, block_q, kv_dim), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, count[i], step, init)
        nonempty = l > 0
        o = acc / jnp.where(nonempty, l, 1.0)[..., None]
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), EMPTY_LSE)
        o_all, lse_all = outputs  # written in place, block by block: no stacked copy
        o_all = jax.lax.dynamic_update_slice_in_dim(o_all, jnp.transpose(o, (0, 2, 1, 3)).astype(v.dtype), start, 1)
        return o_all, jax.lax.dynamic_update_slice_in_dim(lse_all, lse, start, 2)

    init = (jnp.zeros((b, lq, n, kv_dim), v.dtype), jnp.zeros((b, n, lq), jnp.float32))
    return jax.lax.fori_loop(0, lq // block_q, q_block, init)


def _backward(res, do, dlse, causal, block_q, block_k):
    q, k, v, q_ids, kv_ids, q_pos, kv_pos, o, lse = res
    b, lq, n, kdim = q.shape
    scale = 1.0 / jnp.sqrt(jnp.float32(kdim))
    # FlashAttention-2's D = rowsum(dO * O); a log-sum-exp cotangent g adds g * p to ds.
    delta = jnp.einsum("blnk,blnk->bnl", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    order, count = _schedule_lists(block_schedule(q_ids, kv_ids, q_pos, kv_pos, block_q, block_k, causal).T)

    def kv_block(j, grads):
        dq, dk_all, dv_all = grads
        ks = j * block_k
        kj, vj = _slice(k, ks, block_k), _slice(v, ks, block_k)
        kid, kp = _slice(kv_ids, ks, block_k), _slice(kv_pos, ks, block_k, 0)

        def step(t, carry):
            dq, dk, dv = carry
            qs = order[j, t] * block_q
            qi, doi = _slice(q, qs, block_q), _slice(do, qs, block_q)
            mask = _block_mask(_slice(q_ids, qs, block_q), kid, _slice(q_pos, qs, block_q, 0), kp, causal)
            s = _logits(qi, kj, scale)
            p = jnp.where(mask, jnp.exp(s - _slice(lse, qs, block_q, 2)[..., None]), 0.0)
            dv = dv + jnp.einsum("bnqs,bqnk->bsnk", p.astype(do.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqnk,bsnk->bnqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - _slice(delta, qs, block_q, 2)[..., None]) * scale
            dk = dk + jnp.einsum("bnqs,bqnk->bsnk", ds, qi.astype(jnp.float32))
            dqi = _slice(dq, qs, block_q) + jnp.einsum("bnqs,bsnk->bqnk", ds, kj.astype(jnp.float32))
            return jax.lax.dynamic_update_slice_in_dim(dq, dqi, qs, 1), dk, dv

        zeros_k = jnp.zeros((b, block_k, n, kdim), jnp.float32)
        zeros_v = jnp.zeros((b, block_k, n, v.shape[-1]), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, count[j], step, (dq, zeros_k, zeros_v))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk_all, dk.astype(k.dtype), ks, 1),
                jax.lax.dynamic_update_slice_in_dim(dv_all, dv.astype(v.dtype), ks, 1))

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    dq, dk, dv = jax.lax.fori_loop(0, k.shape[1] // block_k, kv_block, init)
    return dq.astype(q.dtype), dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_ids, kv_ids, q_pos, kv_pos, causal, block_q, block_k):
    return _forward(q, k, v, q_ids, kv_ids, q_pos, kv_pos, causal, block_q, block_k)


def _attention_fwd(q, k, v, q_ids, kv_ids, q_pos, kv_pos, causal, block_q, block_k):
    o, lse = _forward(q, k, v, q_ids, kv_ids, q_pos, kv_pos, causal, block_q, block_k)
    return (o, lse), (q, k, v, q_ids, kv_ids, q_pos, kv_pos, o, lse)


def _attention_bwd(causal, block_q, block_k, res, cotangents):
    do, dlse = cotangents
    dq, dk, dv = _backward(res, do, dlse, causal, block_q, block_k)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, *,
                        causal: bool = False, q_positions: Array | None = None, kv_positions: Array | None = None,
                        block_q: int = 512, block_k: int = 512) -> tuple[Array, Array]:
    """Memory-linear attention with its log-sum-exp, differentiable in q, k and v (and the lse).

    Args:
      q: `(B, L, N, K)`; k: `(B, S, N, K)`; v: `(B, S, N, Kv)`; any float dtype (logits, softmax and
        accumulation in float32).
      q_segment_ids: `(B, L)` int; kv_segment_ids: `(B, S)` int. Query l sees key s iff the ids are
        equal and nonzero (pass ones for "no packing"; fold a key mask in as 0).
      causal: also require `q_positions[l] >= kv_positions[s]`.
      q_positions, kv_positions: `(L,)`, `(S,)` int global token positions for causality (default
        `arange`; ring attention passes its shard offsets).
      block_q, block_k: block sizes in tokens (clipped to L and S; L and S are padded up to a
        multiple, padding gets segment id 0).

    Returns:
      `o (B, L, N, Kv)` in v's dtype (0 on rows with no key) and `lse (B, N, L)` float32, the
      log of each row's softmax denominator (`EMPTY_LSE` on rows with no key).

    Memory: O(B N (L + S) K) plus one block pair's `(B, N, block_q, block_k)` logits, forward and
    backward. Cost: the block pairs that can meet (see the module docstring).

    Source: see the module docstring; equals `attention.dot_product_attention(implementation="xla")`
    to 1e-5 in float32 (tests/models/test_attention_backends.py).
    """
    b, lq, n, _ = q.shape
    s = k.shape[1]
    bq, bk = min(block_q, lq), min(block_k, s)
    lp, sp = -(-lq // bq) * bq, -(-s // bk) * bk
    q_pos = jnp.arange(lq, dtype=jnp.int32) if q_positions is None else q_positions.astype(jnp.int32)
    kv_pos = jnp.arange(s, dtype=jnp.int32) if kv_positions is None else kv_positions.astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    o, lse = _attention(_pad(q, 1, lp, 0), _pad(k, 1, sp, 0), _pad(v, 1, sp, 0),
                        _pad(q_segment_ids.astype(jnp.int32), 1, lp, 0),
                        _pad(kv_segment_ids.astype(jnp.int32), 1, sp, 0),
                        _pad(q_pos, 0, lp, -1), _pad(kv_pos, 0, sp, big), causal, bq, bk)
    return o[:, :lq], lse[:, :, :lq]
