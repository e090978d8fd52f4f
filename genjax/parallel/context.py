"""Sequence (context) parallelism: attention over tokens split across the `context` mesh axis.

With a mesh axis `context` of size c > 1 (`genjax.parallel.mesh`, logical name `length` -> "context"
in `axes.RULES`), every activation `(B, L, D)` holds L / c tokens per device, and everything but
attention is token-wise. Attention needs every key, so `genjax.models.attention.dot_product_attention`
calls one of the functions below, each a `jax.shard_map` over the current mesh
(`jax.sharding.get_abstract_mesh()`, i.e. inside `jax.set_mesh(mesh)`), with the layout of
`axes.RULES`: batch over ("data", "fsdp"), tokens over "context", heads over "tensor" (an axis
whose size does not divide the dimension is left replicated):

  ulysses_attention       (B, L/c, N, K) --all-to-all--> (B, L, N/c, K), local attention over the
                          full sequence for N/c heads, all-to-all back. Two all-to-alls of q, k,
                          v, o per layer; needs the (per tensor shard) heads divisible by c.
                          Source: Jacobs et al. 2023, DeepSpeed-Ulysses.
  ring_attention          q stays; k, v, their segment ids travel round the ring (`ppermute`, c
                          steps); each step gives a partial (o_i, lse_i) over one key shard at
                          global positions (causality), merged by the online-softmax rule
                          o = sum_i exp(lse_i - lse) o_i, lse = logsumexp_i lse_i. Memory per
                          device O(L / c); any head count. Source: Liu et al. 2023, Ring
                          Attention with Blockwise Transformers; the merge is Milakov &
                          Gimelshein 2018's online softmax.
  local_query_attention   cross-attention to keys that are not split over context (text
                          tokens): each device attends its queries to all keys, no communication.

This package sits below `genjax.models` (tests/test_layers.py), so the local attention is passed
in as a callable; `dot_product_attention` chooses the function. The strategy for self-attention
("ring" or "ulysses", config `mesh.context_parallel`) is read at trace time from a thread-local
context set by `strategy(name)`, the way `nn.logical_axis_rules` passes the rules (but part of
jit's cache key, `jax.make_user_context`); the trainer traces its step under
`strategy(mesh_lib.context_parallel(config.mesh))`.

Mask semantics are those of `attention.attention_mask` (packed segment ids with 0 = padding, key
masks, causality at global token positions), so a sequence-parallel call equals the one-device
call (tests/parallel/test_context.py: forward and gradient to 1e-5 in float32).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from genjax.errors import check
from genjax.parallel.axes import BATCH_AXES, CONTEXT_AXIS, TENSOR_AXIS

Array = jax.Array
# local(q, k, v, q_segment_ids, kv_segment_ids, kv_mask) -> o, with dot_product_attention's masks
LocalAttention = Callable[[Array, Array, Array, Array | None, Array | None, Array | None], Array]
# local_lse(q, k, v, q_ids, kv_ids, q_positions, kv_positions) -> (o, lse (B, N, L) float32)
LocalAttentionLse = Callable[[Array, Array, Array, Array, Array, Array, Array], tuple[Array, Array]]

STRATEGIES = ("ring", "ulysses")
DEFAULT_STRATEGY = "ring"
# A thread-local value that is part of jit's cache key (`jax.make_user_context`): a jitted function
# called under another strategy is traced again instead of reusing the other strategy's program.
_STRATEGY = jax.make_user_context(default_value=DEFAULT_STRATEGY)


@contextlib.contextmanager
def strategy(name: str) -> Iterator[str]:
    """Within the block, sequence-parallel self-attention traced here uses `name` ("ring" or
    "ulysses"); like `nn.logical_axis_rules`, it acts where a function is traced (wrap the
    `jit` call or `.lower`), not where it was defined.

    Raises:
      UserError: `name` not in `STRATEGIES` (at the `with`, before anything is traced).
    """
    check(name in STRATEGIES, "mesh.context_parallel", name, f"must be one of {STRATEGIES}")
    with _STRATEGY(name):
        yield name


def current_strategy() -> str:
    """The strategy of the innermost `strategy(...)` block ("ring" outside any)."""
    return _STRATEGY.value


def context_size(mesh=None) -> int:
    """Size of the `context` axis of `mesh` (default: the current abstract mesh); 1 when there is
    no mesh, no such axis, or it is already manual (inside a shard_map over it)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if CONTEXT_AXIS not in mesh.axis_names or CONTEXT_AXIS in mesh.manual_axes:
        return 1
    return int(mesh.shape[CONTEXT_AXIS])


def _free(mesh, axis: str) -> bool:
    return axis in mesh.axis_names and axis not in mesh.manual_axes


def _layout(b: int, n: int):
    """(mesh, c, batch axes or None, heads axis or None, shard_map axis names) for `(B, ., N, .)` arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in BATCH_AXES if _free(mesh, a))
    if not batch or b % math.prod(mesh.shape[a] for a in batch):
        batch = None
    heads = TENSOR_AXIS if _free(mesh, TENSOR_AXIS) and n % mesh.shape[TENSOR_AXIS] == 0 else None
    names = frozenset(a for a in mesh.axis_names if a not in mesh.manual_axes)
    return mesh, context_size(mesh), batch, heads, names


def _shard_map(body, names, in_specs, out_specs):
    # check_vma off: the local attention (blockwise_attention's loops, the ring's scans) starts
    # loop carries from fresh zeros, which varying-manual-axes checking rejects as a type
    # mismatch. Without it shard_map's transpose psums input cotangents over the axes their spec
    # leaves out, which is exact here: every output spec names all axes the output varies over.
    return jax.shard_map(body, in_specs=in_specs, out_specs=out_specs, axis_names=names, check_vma=False)


def _masks(q_segment_ids, kv_segment_ids, kv_mask) -> tuple[dict[str, Array], bool]:
    """The given mask arrays by name, and whether the key ids are the query ids (self-attention)."""
    same = q_segment_ids is not None and kv_segment_ids is q_segment_ids
    masks = {"q": q_segment_ids, "kv": None if same else kv_segment_ids, "mask": kv_mask}
    return {k: x for k, x in masks.items() if x is not None}, same


def ulysses_attention(local: LocalAttention, q: Array, k: Array, v: Array, q_segment_ids: Array | None = None,
                      kv_segment_ids: Array | None = None, kv_mask: Array | None = None) -> Array:
    """DeepSpeed-Ulysses attention over the `context` axis of the current mesh.

    Each device holds `(B, L/c, N, K)` queries and `(B, S/c, N, K)` keys / values (L, S divisible by
    c); an all-to-all turns them into `(B, L, N/c, K)` / `(B, S, N/c, K)` (all tokens, c-th of the
    heads), `local` attends over the full sequence, and an all-to-all turns `(B, L, N/c, K)` back
    into `(B, L/c, N, K)`. The mask arrays `(B, L)` / `(B, S)` are all-gathered over context (the
    shard_map takes them replicated over it: they are small). Causality needs no positions here:
    every device sees whole sequences.

    Args:
      local: `(q, k, v, q_segment_ids, kv_segment_ids, kv_mask) -> o` on one device's shard, with
        `dot_product_attention`'s masks (None where not given; the key ids are the query ids object
        when they were on entry). Causality is `local`'s business.
      q: `(B, L, N, K)`; k, v: `(B, S, N, K)`, global arrays (inside jit, under `jax.set_mesh`).
      q_segment_ids, kv_segment_ids, kv_mask: `(B, L)`, `(B, S)`, `(B, S)` or None.

    Returns:
      `(B, L, N, Kv)`, sharded `(batch, context, tensor)`.

    Raises:
      UserError: the heads per tensor shard not divisible by the context size.

    Source: Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of
    Extreme Long Sequence Transformer Models", sec. 3.
    """
    _, c, batch, heads, names = _layout(q.shape[0], q.shape[2])
    n = q.shape[2]
    per_shard = n // (jax.sharding.get_abstract_mesh().shape[TENSOR_AXIS] if heads else 1)
    check(per_shard % c == 0, "num_heads", n,
          f"Ulysses needs the heads per tensor shard ({per_shard}) divisible by mesh.context={c}; "
          f"use mesh.context_parallel='ring'")
    masks, same = _masks(q_segment_ids, kv_segment_ids, kv_mask)
    seq = P(batch, CONTEXT_AXIS, heads, None)

    def body(q, k, v, masks):
        to_heads = lambda x: jax.lax.all_to_all(x, CONTEXT_AXIS, 2, 1, tiled=True)  # noqa: E731
        qi = masks.get("q")
        o = local(to_heads(q), to_heads(k), to_heads(v), qi, qi if same else masks.get("kv"), masks.get("mask"))
        return jax.lax.all_to_all(o, CONTEXT_AXIS, 1, 2, tiled=True)

    specs = {name: P(batch, None) for name in masks}
    return _shard_map(body, names, (seq, seq, seq, specs), seq)(q, k, v, masks)


def local_query_attention(local: LocalAttention, q: Array, k: Array, v: Array, q_segment_ids: Array | None = None,
                          kv_segment_ids: Array | None = None, kv_mask: Array | None = None) -> Array:
    """Cross-attention from sequence-split queries to keys held whole on every context shard.

    q `(B, L, N, K)` is split over context (L divisible by c), k, v `(B, S, N, K)` and the key-side
    masks are replicated over it (text tokens: small, not sequence-split); each device runs
    `local` on its L/c queries and all keys: no communication in the forward, a psum of the
    key / value gradients over context in the backward. Not causal (a causal mask would need the
    queries' global positions: `dot_product_attention` sends causal calls to ring / Ulysses).

    Args / Returns: as `ulysses_attention`.
    """
    _, _, batch, heads, names = _layout(q.shape[0], q.shape[2])
    masks, _ = _masks(q_segment_ids, kv_segment_ids, kv_mask)
    seq, rep = P(batch, CONTEXT_AXIS, heads, None), P(batch, None, heads, None)
    specs = {name: P(batch, CONTEXT_AXIS if name == "q" else None) for name in masks}

    def body(q, k, v, masks):
        return local(q, k, v, masks.get("q"), masks.get("kv"), masks.get("mask"))

    return _shard_map(body, names, (seq, rep, rep, specs), seq)(q, k, v, masks)


def _merge(o1: Array, lse1: Array, o2: Array, lse2: Array) -> tuple[Array, Array]:
    """Online-softmax merge of two partial results (o `(B, L, N, K)` float32, lse `(B, N, L)`).

    Shifted by the larger lse, so one weight is exactly 1 and the sum is in [1, 2]: no overflow,
    no log(0). Rows empty on both sides (lse = blockwise's finite EMPTY_LSE = -1e30, or the
    float32 minimum the ring starts from) stay finite (-1e30 + log 2 rounds to -1e30) with o = 0;
    a side that is empty next to one that is not gets weight exp(-1e30 - x) = 0.
    """
    m = jnp.maximum(lse1, lse2)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    total = w1 + w2
    weight = lambda w: jnp.swapaxes(w / total, 1, 2)[..., None]  # noqa: E731  (B, N, L) -> (B, L, N, 1)
    return weight(w1) * o1 + weight(w2) * o2, m + jnp.log(total)


def _ring(local: LocalAttentionLse, c: int, q, k, v, q_ids, kv_ids):
    """Ring attention on one device's shards (inside the shard_map): `(o, lse)` of its queries."""
    f32 = jnp.float32
    perm = [(i, (i + 1) % c) for i in range(c)]  # after t shifts, device d holds key shard (d - t) mod c

    def shift(tree):
        return jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, perm), tree)

    def attend(q, k, v, q_ids, kv_ids, t):
        """Partial (o, lse) of the local queries over key shard (d - t) mod c, at global positions."""
        d = jax.lax.axis_index(CONTEXT_AXIS)
        lq, sk = q.shape[1], k.shape[1]
        q_pos = d * lq + jnp.arange(lq, dtype=jnp.int32)
        kv_pos = jnp.mod(d - t, c) * sk + jnp.arange(sk, dtype=jnp.int32)
        return local(q, k, v, q_ids, kv_ids, q_pos, kv_pos)

    # One scan step per key shard; each step ends by passing its keys on, so the last step's
    # shift (which brings every shard home) is spare in the forward and carries dk, dv home in
    # the backward. One step body each way keeps the program (and its compile time) small.
    def forward(q, k, v, q_ids, kv_ids):
        def step(carry, t):
            o, lse, kv = carry
            o_t, lse_t = attend(q, kv[0], kv[1], q_ids, kv[2], t)
            o, lse = _merge(o, lse, o_t.astype(f32), lse_t)
            return (o, lse, shift(kv)), None

        b, lq, n, _ = q.shape
        o = jnp.zeros((b, lq, n, v.shape[-1]), f32)
        lse = jnp.full((b, n, lq), jnp.finfo(f32).min, f32)  # "nothing yet": weight exactly 0 at the first merge
        (o, lse, _), _ = jax.lax.scan(step, (o, lse, (k, v, kv_ids)), jnp.arange(c))
        return o, lse

    # The gradient re-walks the ring instead of letting autodiff keep every step's k, v, o_i
    # (c times this shard's size, i.e. the whole sequence per device): step i's cotangents follow
    # from the merged (o, lse) alone (do_i = w_i do, dlse_i = w_i (rowsum(do * (o_i - o)) + dlse),
    # w_i = exp(lse_i - lse)), and dk, dv travel round the ring with their k, v, arriving home
    # after c shifts. Step i's (o_i, lse_i) are recomputed by `jax.vjp(local)`, as remat would.
    @jax.custom_vjp
    def ring(q, k, v, q_ids, kv_ids):
        o, lse = forward(q, k, v, q_ids, kv_ids)
        return o.astype(v.dtype), lse

    def ring_fwd(q, k, v, q_ids, kv_ids):
        o, lse = forward(q, k, v, q_ids, kv_ids)
        return (o.astype(v.dtype), lse), (q, k, v, q_ids, kv_ids, o, lse)

    def ring_bwd(res, cotangents):
        q, k, v, q_ids, kv_ids, o, lse = res
        do, dlse = cotangents
        do = do.astype(f32)

        def step(carry, t):
            dq, kv, dkv = carry
            (o_t, lse_t), vjp = jax.vjp(lambda q, k, v: attend(q, k, v, q_ids, kv[2], t), q, kv[0], kv[1])
            w = jnp.exp(lse_t - lse)  # (B, N, L), <= 1: this step's share of each row
            dlse_t = w * (jnp.einsum("blnk,blnk->bnl", do, o_t.astype(f32) - o) + dlse)
            do_t = (jnp.swapaxes(w, 1, 2)[..., None] * do).astype(o_t.dtype)
            dq_t, dk_t, dv_t = vjp((do_t, dlse_t))
            dkv = (dkv[0] + dk_t.astype(f32), dkv[1] + dv_t.astype(f32))
            return (dq + dq_t.astype(f32), *shift((kv, dkv))), None

        zeros = lambda x: jnp.zeros(x.shape, f32)  # noqa: E731
        (dq, _, (dk, dv)), _ = jax.lax.scan(step, (zeros(q), (k, v, kv_ids), (zeros(k), zeros(v))), jnp.arange(c))
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring(q, k, v, q_ids, kv_ids)


def ring_attention(local: LocalAttentionLse, q: Array, k: Array, v: Array, q_ids: Array,
                   kv_ids: Array) -> tuple[Array, Array]:
    """Ring attention over the `context` axis of the current mesh.

    Each device keeps its `(B, L/c, N, K)` queries; its `(B, S/c, N, K)` keys, values and their
    ids pass round the ring of context shards with `jax.lax.ppermute`, c steps in all. Step t
    calls `local` on the queries and the key shard it holds, at their global token positions
    (query shard d covers d*L/c ..., key shard j covers j*S/c ...), for a partial output o_t and
    log-sum-exp lse_t; partials merge with the online-softmax rule (`_merge`: NaN-free also for
    rows with no key at all, whose lse is `blockwise_attention.EMPTY_LSE`). The backward walks
    the ring again (see `_ring`), so memory per device stays O((L + S) / c) per layer.

    Args:
      local: `(q, k, v, q_ids, kv_ids, q_positions, kv_positions) -> (o, lse)`, o `(B, L', N, Kv)`,
        lse `(B, N, L')` float32, with `blockwise_attention`'s contract (query l sees key s iff the
        ids are equal and nonzero and, when causal, q_positions[l] >= kv_positions[s]; an empty row
        gives o = 0, a finite very negative lse) and differentiable in q, k, v and lse.
      q: `(B, L, N, K)`; k, v: `(B, S, N, K)`; L and S divisible by c.
      q_ids, kv_ids: `(B, L)`, `(B, S)` int32 ids in `attention.segment_ids_of`'s form.

    Returns:
      `o (B, L, N, Kv)` in v's dtype, sharded `(batch, context, tensor)`, and `lse (B, N, L)` float32.

    Source: Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for
    Near-Infinite Context", alg. 1; online softmax: Milakov & Gimelshein 2018.
    """
    _, c, batch, heads, names = _layout(q.shape[0], q.shape[2])
    seq, ids = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)

    def body(q, k, v, q_ids, kv_ids):
        return _ring(local, c, q, k, v, q_ids, kv_ids)

    return _shard_map(body, names, (seq, seq, seq, ids, ids), (seq, P(batch, heads, CONTEXT_AXIS)))(
        q, k, v, q_ids, kv_ids)
