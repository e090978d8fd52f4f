"""genjax.models.attention against diffusers / torch references, a hand-written softmax(QK^T/sqrt(d))V,
and exact identities (packed == alone, key mask == keys sliced away, zero-initialised output)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import attention, conv

torch.set_num_threads(1)


def _random_params(m, *args, seed=0, **kw):
    """Params with init's tree, all entries (biases too) drawn N(0, 0.3) with numpy: no RNG compiles."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), *args, **kw))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _softmax_attention(q, k, v, keep=None):
    """softmax(q k^T / sqrt(K)) v in float64 numpy, per head: q (B, L, N, K), k / v (B, S, N, K)."""
    logits = np.einsum("blnk,bsnk->bnls", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(q.shape[-1])
    if keep is not None:
        logits = np.where(keep[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnk->blnk", w, v.astype(np.float64))


def test_attention_packed_equals_each_segment_alone():
    m = attention.Attention(num_heads=2, head_dim=4)
    rng = np.random.default_rng(0)
    lens = [3, 5, 2]
    segs = [rng.normal(size=(1, n, 8)).astype(np.float32) for n in lens]
    pad = 2
    packed = np.concatenate(segs + [rng.normal(size=(1, pad, 8)).astype(np.float32)], 1)
    seg_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(pad)]).astype(np.int32)[None]
    params = _random_params(m, packed)
    apply = jax.jit(m.apply, static_argnames="causal")
    for causal in (False, True):
        out = np.asarray(apply(params, packed, segment_ids=seg_ids, causal=causal))
        start = 0
        for s, n in zip(segs, lens):
            alone = np.asarray(apply(params, s, causal=causal))
            np.testing.assert_allclose(out[:, start:start + n], alone, atol=1e-5)
            start += n
        # padding rows: attention gives exactly 0, so the output is to_out's bias
        np.testing.assert_allclose(out[0, start:], np.broadcast_to(params["params"]["to_out"]["bias"], (pad, 8)),
                                   atol=1e-6)


def test_attention_padding_does_not_leak():
    m = attention.Attention(num_heads=2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 2, 2, 2, 0, 0]], np.int32)
    params = _random_params(m, x)
    apply = jax.jit(m.apply)
    y1 = apply(params, x, segment_ids=seg)
    x2 = np.where((seg == 0)[..., None], 1e3 * rng.normal(size=x.shape), x).astype(np.float32)
    y2 = apply(params, x2, segment_ids=seg)
    assert np.isfinite(np.asarray(y2)).all()
    np.testing.assert_array_equal(np.asarray(y1)[seg != 0], np.asarray(y2)[seg != 0])


def test_cross_attention_matches_diffusers():
    from diffusers.models.attention_processor import Attention as TorchAttention

    torch.manual_seed(0)
    ref = TorchAttention(query_dim=12, cross_attention_dim=10, heads=3, dim_head=5, bias=True, out_bias=True).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    dense = lambda name, n, k: {"kernel": sd[f"{name}.weight"].T.reshape(-1, n, k), "bias": sd[f"{name}.bias"].reshape(n, k)}
    params = {"params": {"to_q": dense("to_q", 3, 5), "to_k": dense("to_k", 3, 5), "to_v": dense("to_v", 3, 5),
                         "to_out": {"kernel": sd["to_out.0.weight"].T.reshape(3, 5, 12), "bias": sd["to_out.0.bias"]}}}
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 12)).astype(np.float32)
    ctx = rng.normal(size=(2, 4, 10)).astype(np.float32)
    keep = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    with torch.no_grad():
        bias = torch.where(torch.from_numpy(keep), 0.0, -torch.inf)[:, None, :]  # (B, 1, S)
        want = ref(torch.from_numpy(x), torch.from_numpy(ctx), attention_mask=bias).numpy()
    m = attention.Attention(num_heads=3, head_dim=5)
    got = m.apply(params, x, ctx, context_mask=keep)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_attention_bf16_close_and_logical_axes():
    x = np.random.default_rng(3).normal(size=(2, 5, 16)).astype(np.float32)
    m32 = attention.Attention(num_heads=4)
    boxed = jax.eval_shape(m32.init, jax.random.key(0), x)["params"]
    assert isinstance(boxed["to_q"]["kernel"], nn.Partitioned)
    assert boxed["to_q"]["kernel"].names == ("embed", "heads", "kv")
    assert boxed["to_out"]["kernel"].names == ("heads", "kv", "embed")
    params = _random_params(m32, x)
    y32 = jax.jit(m32.apply)(params, x)
    y16 = jax.jit(attention.Attention(num_heads=4, dtype=jnp.bfloat16).apply)(params, x)
    assert y16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() <= 0.03 * np.abs(np.asarray(y32)).max()


def test_attention_bad_mask_shape():
    m = attention.Attention(num_heads=2)
    x = jnp.ones((2, 5, 8))
    p = _random_params(m, x)
    with pytest.raises(UserError, match="segment_ids.shape"):
        m.apply(p, x, segment_ids=jnp.ones((2, 4), jnp.int32))


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_dot_product_attention_matches_softmax_reference_and_rejects_implementations(implementation):
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4)))
    keep = np.array([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0, 1]], bool)
    got = attention.dot_product_attention(q, k, v, kv_mask=keep, implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), _softmax_attention(q, k, v, keep), atol=1e-5)
    with pytest.raises(UserError, match="attention_impl='flash'"):
        attention.dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):  # this suite runs on CPU
        attention.dot_product_attention(q, k, v, implementation="cudnn")


def test_zero_init_out_gives_zero_output_at_init():
    m = attention.Attention(num_heads=2, zero_init_out=True)
    x = np.random.default_rng(5).normal(size=(2, 6, 8)).astype(np.float32)
    ctx = np.random.default_rng(6).normal(size=(2, 3, 5)).astype(np.float32)
    params = jax.jit(m.init)(jax.random.key(0), x, ctx)
    to_out = nn.unbox(params)["params"]["to_out"]
    assert to_out["kernel"].shape == (2, 4, 8)
    np.testing.assert_array_equal(np.asarray(m.apply(params, x, ctx)), 0.0)
    # the default init is not zero, so the test above can fail
    plain = attention.Attention(num_heads=2)
    assert np.abs(np.asarray(plain.apply(plain.init(jax.random.key(0), x, ctx), x, ctx))).max() > 1e-3


def test_key_mask_equals_slicing_the_masked_keys_away():
    m = attention.Attention(num_heads=2, head_dim=3)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 4, 6)).astype(np.float32)
    ctx = rng.normal(size=(1, 6, 6)).astype(np.float32)
    keep = np.array([[1, 0, 1, 1, 0, 1]], bool)
    params = _random_params(m, x, ctx)
    masked = m.apply(params, x, 1e3 * (~keep[..., None]) + ctx, context_mask=keep)  # masked keys: huge values
    sliced = m.apply(params, x, ctx[:, keep[0]])
    np.testing.assert_allclose(np.asarray(masked), np.asarray(sliced), atol=1e-5)
    # self-attention with a key mask equals attending to the kept tokens only
    y = rng.normal(size=(1, 6, 6)).astype(np.float32)
    self_masked = np.asarray(m.apply(params, y, context_mask=keep))
    np.testing.assert_allclose(self_masked, np.asarray(m.apply(params, y, y[:, keep[0]])), atol=1e-5)


@pytest.mark.parametrize("head_dim,groups", [(None, None), (4, 2)])
def test_conv_attention_equals_hand_written_softmax(head_dim, groups):
    """conv.SpatialAttention == GroupNorm -> softmax(Q K^T / sqrt(d)) V per head -> out proj -> + x."""
    c, hgt, wid = 8, 3, 5
    block = conv.SpatialAttention(head_dim=head_dim, num_groups=groups, eps=1e-6)
    x = np.random.default_rng(8).normal(size=(2, hgt, wid, c)).astype(np.float32)
    params = _random_params(block, x)
    p = params["params"]
    h = x.astype(np.float64)
    if groups:
        g = h.reshape(2, hgt * wid, groups, c // groups)
        g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
        h = g.reshape(2, hgt, wid, c) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
    h = h.reshape(2, hgt * wid, c)
    a = p["attn"]
    q, k, v = (np.einsum("blc,cnk->blnk", h, a[n]["kernel"]) + a[n]["bias"] for n in ("to_q", "to_k", "to_v"))
    o = np.einsum("blnk,nkc->blc", _softmax_attention(q, k, v), a["to_out"]["kernel"]) + a["to_out"]["bias"]
    want = o.reshape(x.shape) + x
    np.testing.assert_allclose(np.asarray(block.apply(params, x)), want, atol=1e-4)


def test_explicit_mask_equals_the_causal_flag_and_is_refused_by_fused_implementations():
    """`mask=tril` gives the `causal=True` output (forward and gradient) on "xla" and "auto"; the
    implementations that cannot take an (L, S) mask refuse it by name."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 2, 4)) for i in range(3))
    tril = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    want = attention.dot_product_attention(q, k, v, causal=True, implementation="xla")
    for impl in ("xla", "auto"):
        got = attention.dot_product_attention(q, k, v, mask=tril, implementation=impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    grad = lambda **kw: jax.grad(lambda q: jnp.sum(attention.dot_product_attention(q, k, v, **kw) ** 2))(q)  # noqa: E731
    np.testing.assert_allclose(np.asarray(grad(mask=tril)), np.asarray(grad(causal=True)), atol=1e-5)
    with pytest.raises(UserError, match="attention_impl='blockwise': does not take an explicit"):
        attention.dot_product_attention(q, k, v, mask=tril, implementation="blockwise")
