"""Video DiT: packed == each example alone, segment isolation, text masking, scan == loop, compile reuse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.data import packing
from genjax.errors import UserError
from genjax.models import video_dit

PATCH = (1, 2, 2)
DT, ST = 5, 4  # text width, text tokens


def _model(**kw):
    return video_dit.VideoDiT(**{**dict(patch_size=PATCH, in_channels=3, hidden_size=24, depth=2, num_heads=2,
                                        context_dim=DT, num_classes=0), **kw})


def _args(b=1, shape=(3, 4, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, *shape, 3)).astype(np.float32)
    t = rng.uniform(0, 999, size=(b,)).astype(np.float32)
    text = rng.normal(size=(b, ST, DT)).astype(np.float32)
    mask = np.ones((b, ST), bool)
    mask[:, 2:] = rng.uniform(size=(b, ST - 2)) < 0.5
    return x, t, text, mask


def _random_params(module, *args, seed=0, std=0.1, **kwargs):
    """Every parameter (zero-initialised ones too) random, so outputs depend on all of them."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(np.float32), shapes)


# Examples of different durations / sizes / aspects, one image (T = 1).
SHAPES = [(3, 4, 6), (1, 6, 4), (2, 2, 2), (4, 4, 4)]


def _examples(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    vids = [rng.normal(size=(*s, 3)).astype(np.float32) for s in shapes]
    ts = rng.uniform(0, 999, size=len(shapes)).astype(np.float32)
    texts = rng.normal(size=(len(shapes), ST, DT)).astype(np.float32)
    masks = np.ones((len(shapes), ST), bool)
    masks[:, 1:] = rng.uniform(size=(len(shapes), ST - 1)) < 0.6
    return vids, ts, texts, masks


def _per_slot(batch, values, fill=0):
    """values[i] for example i -> (S, M, ...) by example_index; `fill` in empty slots."""
    values = np.asarray(values)
    idx = batch["example_index"]
    out = np.where((idx >= 0).reshape(idx.shape + (1,) * (values.ndim - 1)), values[np.maximum(idx, 0)], fill)
    return out.astype(values.dtype)


def _pack(vids, seq_len=64, max_per_seq=3):
    return packing.pack(vids, seq_len=seq_len, patch_size=PATCH, max_per_seq=max_per_seq)


@pytest.fixture(scope="module")
def setup():
    m = _model(attention="joint")
    x, t, text, mask = _args()
    params = _random_params(m, x, t, text=text, text_mask=mask)
    return m, params, jax.jit(m.apply)


def _packed_fn(m):
    return jax.jit(lambda p, batch, t, tx, tm: video_dit.apply_packed(m, p, batch, t, text=tx, text_mask=tm))


@pytest.mark.parametrize("attention, pos_embed", [("joint", "sincos"), ("factorised", "sincos"),
                                                   ("joint", "rope"), ("factorised", "rope")])
def test_packed_equals_each_example_alone(attention, pos_embed, setup):
    m, params, apply = setup
    if (attention, pos_embed) != ("joint", "sincos"):  # factorised: attn_spatial, attn_temporal, 9 modulations
        m = m.clone(attention=attention, pos_embed=pos_embed)
        x, t, text, mask = _args()
        params = _random_params(m, x, t, text=text, text_mask=mask)
        apply = jax.jit(m.apply)
    vids, ts, texts, masks = _examples()
    batch = _pack(vids)
    assert batch["tokens"].shape[0] == 2  # several examples share a sequence
    out = _packed_fn(m)(params, batch, _per_slot(batch, ts), _per_slot(batch, texts), _per_slot(batch, masks))
    assert out.shape == (2, 64, 12) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out)[batch["segment_ids"] == 0], 0.0)
    got = packing.unpack({**batch, "tokens": np.asarray(out)})
    for i, v in enumerate(vids):
        want = np.asarray(apply(params, v[None], ts[i:i + 1], text=texts[i:i + 1], text_mask=masks[i:i + 1]))[0]
        assert got[i].shape == want.shape == v.shape
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_packed_per_frame_timesteps_equal_regular(setup):
    m, params, apply = setup
    vids, _, texts, masks = _examples(shapes=[(3, 4, 6), (2, 2, 2)])
    rng = np.random.default_rng(1)
    t_frames = rng.uniform(0, 999, size=(2, 3)).astype(np.float32)  # F = max frames; (2, 2, 2) uses 2
    t_frames[:, 0] = 0.0  # known first frame
    batch = _pack(vids)
    out = jax.jit(lambda p, b, t, tx, tm: video_dit.apply_packed(m, p, b, t, text=tx, text_mask=tm))(
        params, batch, _per_slot(batch, t_frames), _per_slot(batch, texts), _per_slot(batch, masks))
    got = packing.unpack({**batch, "tokens": np.asarray(out)})
    for i, v in enumerate(vids):
        t = t_frames[i:i + 1, : v.shape[0]]
        want = np.asarray(apply(params, v[None], t, text=texts[i:i + 1], text_mask=masks[i:i + 1]))[0]
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    # a per-frame t that is the same on every frame is the per-example form
    same = np.asarray(apply(params, vids[0][None], t_frames[:1, :1].repeat(3, 1), text=texts[:1],
                              text_mask=masks[:1]))
    per_ex = np.asarray(apply(params, vids[0][None], t_frames[:1, 0], text=texts[:1], text_mask=masks[:1]))
    np.testing.assert_allclose(same, per_ex, atol=1e-5)


def test_examples_are_isolated_and_text_padding_is_ignored(setup):
    m, params, apply = setup
    vids, ts, texts, masks = _examples()
    batch = _pack(vids)
    fn = _packed_fn(m)
    args = (_per_slot(batch, ts), _per_slot(batch, texts), _per_slot(batch, masks))
    base = np.asarray(fn(params, batch, *args))
    s0, j0 = np.argwhere(batch["example_index"] == 0)[0]  # example 0 shares sequence s0 with others
    own = batch["segment_ids"] == j0 + 1
    own[1 - s0] = False
    assert (batch["segment_ids"][s0][~own[s0]] > 0).any()

    def check_only_example0_changed(out):
        out = np.asarray(out)
        assert np.abs(out[own] - base[own]).max() > 1e-3
        np.testing.assert_array_equal(out[~own], base[~own])

    tokens = batch["tokens"].copy()
    tokens[own] += 1.0
    check_only_example0_changed(fn(params, {**batch, "tokens": tokens}, *args))
    t = args[0].copy()
    t[s0, j0] += 100.0
    check_only_example0_changed(fn(params, batch, t, *args[1:]))
    text = args[1].copy()
    text[s0, j0, 0] += 1.0
    check_only_example0_changed(fn(params, batch, args[0], text, args[2]))
    # padding text tokens (mask 0) and empty slots never influence anything
    junk = np.where(args[2][..., None], args[1], 1e4).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(fn(params, batch, args[0], junk, args[2])), base)
    x, t1, text1, mask1 = _args()
    junk1 = np.where(mask1[..., None], text1, -1e4).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(apply(params, x, t1, text=junk1, text_mask=mask1)),
                                  np.asarray(apply(params, x, t1, text=text1, text_mask=mask1)))


def test_one_compiled_shape_for_different_mixes(setup):
    m, params, apply = setup
    fn = _packed_fn(m)
    for seed, shapes in enumerate([SHAPES, [(4, 2, 4), (1, 8, 8), (2, 4, 2)]]):
        vids, ts, texts, masks = _examples(seed, shapes)
        batch = _pack(vids)
        batch = {k: v[:1] for k, v in batch.items()}  # one sequence: same (S, L, M) for both mixes
        out = fn(params, batch, _per_slot(batch, ts), _per_slot(batch, texts), _per_slot(batch, masks))
        assert out.shape == (1, 64, 12)
    assert fn._cache_size() == 1


def test_fresh_init_outputs_zero_and_param_axes():
    m = _model(depth=1, attention="factorised", num_classes=4, learn_sigma=True)
    x, t, text, mask = _args(b=2, shape=(2, 4, 2))
    y = np.array([1, 4], np.int32)
    params = jax.jit(m.init)(jax.random.key(0), x, t, y, text=text, text_mask=mask)
    assert params["params"]["blocks_0"]["attn_temporal"]["to_q"]["kernel"].names == ("embed", "heads", "kv")
    out = jax.jit(m.apply)(params, x, t, y, text=text, text_mask=mask)
    assert out.shape == (2, 2, 4, 2, 6) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # adaLN-Zero


def test_scan_and_remat_equal_unrolled():
    m = _model(depth=3, attention="factorised")
    x, t, text, mask = _args(b=2)
    params = _random_params(m, x, t, text=text, text_mask=mask)
    want = np.asarray(jax.jit(m.apply)(params, x, t, text=text, text_mask=mask))
    sp = {"params": dict(params["params"])}
    sp["params"]["blocks"] = jax.tree.map(lambda *a: np.stack(a), *[sp["params"].pop(f"blocks_{i}") for i in range(3)])
    sm = m.clone(scan=True, remat="full")
    init = nn.unbox(jax.eval_shape(sm.init, jax.random.key(0), x, t, text=text, text_mask=mask))
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, sp)
    np.testing.assert_allclose(np.asarray(jax.jit(sm.apply)(sp, x, t, text=text, text_mask=mask)), want, atol=1e-5)


def test_bf16_close_to_f32_and_cfg_drop(setup):
    m, params, apply = setup
    x, t, text, mask = _args(b=2)
    y32 = np.asarray(apply(params, x, t, text=text, text_mask=mask))
    y16 = np.asarray(jax.jit(m.clone(dtype=jnp.bfloat16).apply)(params, x, t, text=text, text_mask=mask))
    assert np.abs(y16 - y32).max() <= 0.05 * np.abs(y32).max()
    # force_drop_ids = the null text written out by hand (one valid null token, null pooled vector)
    null = params["params"]["text_embedder"]
    null_mask = np.zeros_like(mask)
    null_mask[:, 0] = True
    want = np.asarray(apply(params, x, t, text=np.broadcast_to(null["null_text"], text.shape), text_mask=null_mask,
                              text_pooled=np.broadcast_to(null["null_pooled"], (2, DT))))
    got = np.asarray(apply(params, x, t, text=text, text_mask=mask, force_drop_ids=np.array([1, 0])))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], y32[1], atol=1e-5)


def test_variant_param_count_matches_architecture():
    """XL/2 parameters from the architecture's formula (an independent count of every Dense)."""
    m = video_dit.Model(variant="XL/2")
    x = jax.ShapeDtypeStruct((1, 2, 4, 4, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 3, 4096), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 3), jnp.bool_)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(jax.eval_shape(m.init, jax.random.key(0), x, t,
                                                                          text=text, text_mask=mask)))
    d, dt, depth, p_in, p_out = 1152, 4096, 28, 16, 32

    def dense(i, o):
        return i * o + o

    block = dense(d, 9 * d) + 3 * 4 * dense(d, d) + dense(d, 4 * d) + dense(4 * d, d)  # adaLN, 2 self + cross, MLP
    embed = dense(p_in, d) + dense(256, d) + dense(d, d) + 2 * dt + 2 * (dense(dt, d) + dense(d, d))
    final = dense(d, 2 * d) + dense(d, p_out)
    assert n == depth * block + embed + final


@pytest.mark.parametrize("x_shape,kw,match", [
    ((1, 3, 5, 6, 3), {}, "tubelet"),
    ((1, 3, 4, 6, 2), {}, "in_channels"),
    ((3, 4, 6, 3), {}, "x.shape"),
    ((1, 3, 4, 6, 3), dict(text_mask=None), "text_mask"),
    ((1, 3, 4, 6, 3), dict(text=None, text_mask=None), "text.shape"),
    ((1, 3, 4, 6, 3), dict(t=np.zeros((1, 2))), "t.shape"),
    ((1, 3, 4, 6, 3), dict(y=np.zeros(1, np.int32)), "num_classes"),
])
def test_bad_input_raises(x_shape, kw, match):
    _, t, text, mask = _args()
    args = dict(t=t, text=text, text_mask=mask)
    args.update(kw)
    with pytest.raises(UserError, match=match):
        jax.eval_shape(_model().init, jax.random.key(0), np.zeros(x_shape, np.float32), args.pop("t"), **args)


def test_bad_packed_input_raises(setup):
    m, params, apply = setup
    batch = _pack(_examples()[0])
    ok = dict(text=np.zeros((2, 3, ST, DT), np.float32), text_mask=np.ones((2, 3, ST), bool))
    with pytest.raises(UserError, match="tokens.shape"):
        video_dit.apply_packed(m, params, {**batch, "tokens": batch["tokens"][..., :5]}, np.zeros((2, 3)), **ok)
    with pytest.raises(UserError, match="text.shape"):
        video_dit.apply_packed(m, params, batch, np.zeros((2, 3)), text=ok["text"][:, :2], text_mask=ok["text_mask"])
    with pytest.raises(UserError, match="segment_ids"):
        video_dit.apply_packed(m, params, {**batch, "segment_ids": batch["segment_ids"][:, :5]}, np.zeros((2, 3)), **ok)
    with pytest.raises(UserError, match="variant"):
        video_dit.Model(variant="XXL/2")


def test_rope_matches_wan_complex_rotation_and_is_relative():
    """3D RoPE: `apply_rope(x, rope_angles(positions, K))` equals Wan 2.1's rope_apply, written here
    with complex numbers (pairs as complex, K/2 = c frequencies split c - 2(c//3), c//3, c//3 over
    t, h, w, theta^(-2i/dim) per axis); and attention under RoPE depends only on position
    differences, so shifting every position leaves the output unchanged."""
    from genjax.models.attention import Attention
    from genjax.models.spacetime import apply_rope, rope_angles

    rng = np.random.default_rng(0)
    k_dim, b, l, n = 20, 2, 7, 3
    pos = rng.integers(0, 30, size=(b, l, 3))
    x = rng.normal(size=(b, l, n, k_dim)).astype(np.float32)
    c = k_dim // 2
    splits = [c - 2 * (c // 3), c // 3, c // 3]
    freqs = []
    for axis, dim in zip(range(3), [2 * s for s in splits]):
        inv = 1.0 / np.power(10000.0, np.arange(0, dim, 2) / dim)
        freqs.append(np.exp(1j * np.outer(pos[..., axis].ravel(), inv)).reshape(b, l, -1))
    rot = np.concatenate(freqs, axis=-1)[:, :, None]  # (b, l, 1, c)
    xc = x.astype(np.float64).reshape(b, l, n, c, 2)
    want = (xc[..., 0] + 1j * xc[..., 1]) * rot
    want = np.stack([want.real, want.imag], axis=-1).reshape(x.shape)
    got = np.asarray(apply_rope(jnp.asarray(x), rope_angles(jnp.asarray(pos), k_dim)))
    np.testing.assert_allclose(got, want, atol=2e-5)

    attn = Attention(num_heads=2)
    h = rng.normal(size=(b, l, 24)).astype(np.float32)
    params = attn.init(jax.random.key(0), h)
    small = pos % 8
    out = attn.apply(params, h, rope=rope_angles(jnp.asarray(small), 12))
    shifted = attn.apply(params, h, rope=rope_angles(jnp.asarray(small + np.array([3, 5, 2])), 12))
    np.testing.assert_allclose(np.asarray(out), np.asarray(shifted), atol=2e-5)
    assert np.abs(np.asarray(out) - np.asarray(attn.apply(params, h))).max() > 1e-3  # RoPE changes it
    with pytest.raises(UserError, match=r"^rope='given': is for self-attention"):
        attn.apply(params, h, h, rope=rope_angles(jnp.asarray(small), 12))
