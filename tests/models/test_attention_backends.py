"""Every attention implementation equals the dense "xla" reference (forward and gradient, float32,
1e-5), the block schedule skips what packing allows, and the packed factorised path builds no
L x L array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.models import attention, spacetime, vivit
from genjax.models.blockwise_attention import EMPTY_LSE, block_schedule, blockwise_attention

B, L, S, N, K = 2, 37, 29, 3, 8


def _packed_ids(rng, b, n, k):
    """Contiguous segment ids 1..k, then padding 0 at the end, as the packer writes them."""
    return np.stack([np.sort(rng.integers(0, k + 1, n))[::-1] for _ in range(b)]).astype(np.int32)


def _inputs(seed=0, l=L, s=S):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, l, N, K)).astype(np.float32)
    k, v = (rng.normal(size=(B, s, N, K)).astype(np.float32) for _ in range(2))
    return rng, q, k, v


CASES = {  # name -> (mask kwargs builder, self-attention)
    "plain": lambda rng: {},
    "packed_self": lambda rng: {"q_segment_ids": (ids := _packed_ids(rng, B, L, 3)), "kv_segment_ids": ids},
    "packed_cross": lambda rng: {"q_segment_ids": _packed_ids(rng, B, L, 3), "kv_segment_ids": _packed_ids(rng, B, S, 3)},
    "key_mask": lambda rng: {"kv_mask": rng.random((B, S)) > 0.4},
    "query_padding_only": lambda rng: {"q_segment_ids": _packed_ids(rng, B, L, 1)},
    "packed_key_mask": lambda rng: {"q_segment_ids": _packed_ids(rng, B, L, 2), "kv_segment_ids": _packed_ids(rng, B, S, 2),
                                    "kv_mask": rng.random((B, S)) > 0.3},
}


def _value_and_grad(fn, q, k, v):
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o * jnp.cos(o)), o  # a non-linear loss so every gradient path matters
    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def _assert_close(got, want, atol=1e-5):
    (o1, g1), (o2, g2) = got, want
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), atol=atol)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("blocks", [(8, 5), (512, 512)])  # uneven blocks (several pairs skipped), one block
def test_blockwise_equals_xla_forward_and_gradient(case, causal, blocks):
    rng, q, k, v = _inputs()
    if case == "packed_self" or case == "query_padding_only":
        k, v = k[:, :1].repeat(L, 1) + rng.normal(size=(B, L, N, K)).astype(np.float32), q * 0.5
    mask = CASES[case](rng)
    want = _value_and_grad(lambda q, k, v: attention.dot_product_attention(
        q, k, v, causal=causal, implementation="xla", **mask), q, k, v)
    q_ids, kv_ids = attention.segment_ids_of(q, k, **{n: mask.get(n) for n in ("q_segment_ids", "kv_segment_ids", "kv_mask")})
    got = _value_and_grad(lambda q, k, v: blockwise_attention(
        q, k, v, q_ids, kv_ids, causal=causal, block_q=blocks[0], block_k=blocks[1])[0], q, k, v)
    _assert_close(got, want)


def test_blockwise_log_sum_exp_and_empty_rows():
    rng, q, k, v = _inputs(1)
    q_ids = np.ones((B, L), np.int32)
    q_ids[0, -5:] = 0  # padding queries
    kv_ids = np.ones((B, S), np.int32)
    kv_ids[1] = 0  # row 1: no key at all
    o, lse = blockwise_attention(q, k, v, q_ids, kv_ids, block_q=8, block_k=8)
    logits = np.einsum("blnk,bsnk->bnls", q, k) / np.sqrt(K)
    np.testing.assert_allclose(np.asarray(lse[0, :, :-5]), np.log(np.exp(logits[0, :, :-5]).sum(-1)), rtol=1e-5)
    assert np.all(np.asarray(lse[0, :, -5:]) == EMPTY_LSE) and np.all(np.asarray(lse[1]) == EMPTY_LSE)
    assert np.all(np.asarray(o[0, -5:]) == 0) and np.all(np.asarray(o[1]) == 0)
    grads = jax.grad(lambda q, k, v: blockwise_attention(q, k, v, q_ids, kv_ids, block_q=8, block_k=8)[0].sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0][1]) == 0)  # rows with no key get no gradient


def test_blockwise_log_sum_exp_gradient_equals_autodiff():
    """The lse output is differentiable (ring attention merges through it): d lse equals autodiff of logsumexp."""
    _, q, k, v = _inputs(2)
    ones_q, ones_k = np.ones((B, L), np.int32), np.ones((B, S), np.int32)

    def dense_lse(q, k):
        return jax.nn.logsumexp(jnp.einsum("blnk,bsnk->bnls", q, k) / jnp.sqrt(float(K)), -1)

    w = np.random.default_rng(3).normal(size=(B, N, L)).astype(np.float32)
    got = jax.grad(lambda q, k: jnp.sum(w * blockwise_attention(q, k, v, ones_q, ones_k, block_q=8, block_k=8)[1]),
                   argnums=(0, 1))(q, k)
    want = jax.grad(lambda q, k: jnp.sum(w * dense_lse(q, k)), argnums=(0, 1))(q, k)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_block_schedule_skips_pairs_of_different_segments():
    """4 contiguous examples of 128 tokens in blocks of 64: 4 * 2 * 2 = 16 of 64 block pairs run
    (the sum of the examples' squares, not L squared); causal halves the diagonal blocks' pairs."""
    ids = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), 128)[None]
    pos = jnp.arange(512, dtype=jnp.int32)
    assert int(block_schedule(ids, ids, pos, pos, 64, 64, False).sum()) == 16
    assert int(block_schedule(ids, ids, pos, pos, 64, 64, True).sum()) == 12
    padded = ids.at[:, 384:].set(0)  # the last example is padding: its blocks never run
    assert int(block_schedule(padded, padded, pos, pos, 64, 64, False).sum()) == 12


def test_pallas_gpu_kernel_equals_xla_in_interpret_mode():
    """JAX's Pallas GPU (Triton) flash kernel with segment ids, forward and its backward kernel, run by
    the Pallas interpreter on CPU."""
    rng, q, _, _ = _inputs(4, l=32)
    k, v = q * 0.7 + 0.1, rng.normal(size=q.shape).astype(np.float32)
    ids = _packed_ids(rng, B, 32, 3)
    want = _value_and_grad(lambda q, k, v: attention.dot_product_attention(
        q, k, v, q_segment_ids=ids, kv_segment_ids=ids, implementation="xla"), q, k, v)
    got = _value_and_grad(lambda q, k, v: attention.pallas_attention(
        q, k, v, jnp.asarray(ids), jnp.asarray(ids), causal=False, platform="cpu"), q, k, v)
    _assert_close(got, want)


@pytest.mark.parametrize("platform,packed,key_mask,self_attention,want", [
    ("cpu", False, False, False, "xla"), ("gpu", False, True, False, "cudnn"), ("gpu", True, False, True, "pallas"),
    ("gpu", True, True, True, "blockwise"), ("gpu", True, False, False, "blockwise"), ("tpu", True, True, False, "pallas")])
def test_auto_resolution(platform, packed, key_mask, self_attention, want):
    assert attention.resolve_implementation("auto", platform=platform, q_len=64, kv_len=64, packed=packed,
                                            key_mask=key_mask, self_attention=self_attention) == want
    long = attention.resolve_implementation("auto", platform="cpu", q_len=4096, kv_len=4096, packed=True,
                                            key_mask=False, self_attention=True)
    assert long == "blockwise"
    with pytest.raises(UserError, match="attention_impl='pallas': on GPU takes self-attention"):
        attention.resolve_implementation("pallas", platform="gpu", q_len=8, kv_len=8, packed=True, key_mask=True,
                                         self_attention=True)


def _group_ids_reference(segment_ids, keys):
    """The definition by brute force: 1 + the first index with the same segment and key."""
    out = np.zeros(segment_ids.shape, np.int32)
    for b in range(segment_ids.shape[0]):
        for i in range(segment_ids.shape[1]):
            if segment_ids[b, i]:
                same = (segment_ids[b] == segment_ids[b, i]) & np.all(keys[b] == keys[b, i], -1)
                out[b, i] = np.argmax(same) + 1
    return out


def test_group_ids_and_group_mean_equal_their_definitions():
    rng = np.random.default_rng(5)
    seg = _packed_ids(rng, 3, 40, 3)
    pos = rng.integers(0, 3, (3, 40, 3)).astype(np.int32)
    for keys in (pos[..., :1], pos[..., 1:]):
        ids = np.asarray(spacetime.group_ids(jnp.asarray(seg), jnp.asarray(keys)))
        np.testing.assert_array_equal(ids, _group_ids_reference(seg, keys))
        x = rng.normal(size=(3, 40, 5)).astype(np.float32)
        want = np.stack([[x[b][ids[b] == ids[b, i]].mean(0) if ids[b, i] else np.zeros(5) for i in range(40)]
                         for b in range(3)])
        np.testing.assert_allclose(np.asarray(vivit._group_mean(jnp.asarray(x), jnp.asarray(ids))), want, atol=1e-6)


def test_packed_factorised_attention_builds_no_l_by_l_array():
    """The gradient of a packed factorised ViViT encoder with the blockwise implementation: no
    value in its jaxpr (forward, backward, inner loops) has L * L / 4 elements or more."""
    l, d = 2048, 32  # 4 examples of 8x8x8 tokens; blocks of 512
    rng = np.random.default_rng(6)
    seg = jnp.asarray(np.repeat(np.arange(1, 5), l // 4)[None].astype(np.int32))
    pos = jnp.asarray(np.concatenate([spacetime.grid_positions((8, 8, 8))] * 4)[None].astype(np.int32))
    x = jnp.asarray(rng.normal(size=(1, l, d)).astype(np.float32))
    enc = vivit.ViViTEncoder(num_layers=1, num_heads=2, mlp_dim=64, attention="factorised_self_attention",
                             attention_impl="blockwise")
    params = jax.eval_shape(enc.init, jax.random.key(0), x, segment_ids=seg, positions=pos)

    def loss(p, x):
        return enc.apply(p, x, segment_ids=seg, positions=pos).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=1))(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params), x)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert max(sizes) < l * l // 4, max(sizes)
    dense = vivit.ViViTEncoder(num_layers=1, num_heads=2, mlp_dim=64, attention="factorised_self_attention",
                               attention_impl="xla")
    dense_jaxpr = jax.make_jaxpr(lambda x: dense.apply(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params), x,
                                                       segment_ids=seg, positions=pos))(x)
    assert any(int(np.prod(v.aval.shape)) >= l * l for e in dense_jaxpr.eqns for v in e.outvars)  # the check can fail
