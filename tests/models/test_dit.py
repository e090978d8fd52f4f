"""DiT: paper Table 4 (params, Gflops), parity with diffusers DiTTransformer2DModel, scan == loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import dit

torch.set_num_threads(1)

# Peebles & Xie 2023, Table 4: params (M) per size; forward Gflops per variant at 256x256
# (latent 32x32x4, learn_sigma, 1000 classes). The /8 values (0.36, 1.42, 5.02) are the ones
# consistent with the /4 rows (16 tokens instead of 64, plus the per-example adaLN cost).
PAPER_PARAMS_M = {"S": 33.0, "B": 130.3, "L": 458.1, "XL": 675.1}
PAPER_GFLOPS = {"S/2": 6.06, "S/4": 1.41, "S/8": 0.36, "B/2": 23.01, "B/4": 5.56, "B/8": 1.42,
                "L/2": 80.71, "L/4": 19.70, "L/8": 5.02, "XL/2": 118.64, "XL/4": 29.05, "XL/8": 7.39}
FAST_GFLOPS = ("S/2", "XL/2")

X = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
T = jax.ShapeDtypeStruct((1,), jnp.float32)
Y = jax.ShapeDtypeStruct((1,), jnp.int32)


@pytest.mark.parametrize("variant", list(dit.VARIANTS))
def test_param_count_matches_paper(variant):
    params = jax.eval_shape(dit.Model(variant=variant).init, jax.random.key(0), X, T, Y)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n / 1e6 == pytest.approx(PAPER_PARAMS_M[variant.split("/")[0]], rel=0.01)


@pytest.mark.parametrize("variant", [
    v if v in FAST_GFLOPS else pytest.param(v, marks=pytest.mark.slow) for v in PAPER_GFLOPS])
def test_gflops_match_paper(variant):
    assert dit.forward_gflops(dit.Model(variant=variant)) == pytest.approx(PAPER_GFLOPS[variant], rel=0.01)


def _torch_dit(seed=0, **kw):
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    m = DiTTransformer2DModel(**{**cfg, **kw}).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    blocks = m.transformer_blocks
    for blk in blocks[1:]:  # real checkpoints hold identical embedder copies in every block
        blk.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    return m


def _state(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def _inputs(b, h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    t = np.array([3.0, 517.5, 999.0][:b], np.float32)
    y = np.array([1, 10, 7][:b], np.int64)  # 10 = null class
    return x, t, y


def _torch_forward(m, x, t, y):
    with torch.no_grad():
        out = m(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kw,size", [
    ({}, 8),                                                   # learn_sigma: 2C out
    (dict(patch_size=4, out_channels=4, in_channels=3), 8),    # C out, patch 4
    (dict(num_attention_heads=4, attention_head_dim=4, num_layers=3), 12),  # input != sample_size
    (dict(norm_eps=0.5), 8),  # diffusers' MLP LayerNorm eps comes from the config (1e-6 elsewhere)
])
def test_matches_diffusers(kw, size, tmp_path):
    ref = _torch_dit(**kw)
    c = kw.get("in_channels", 4)
    x, t, y = _inputs(3, size, size, c)
    want = _torch_forward(ref, x, t, y)
    ref.save_pretrained(tmp_path)  # folder with config.json + safetensors, as on the Hub
    module, params = dit.load_diffusers(str(tmp_path))
    got = jax.jit(module.apply)({"params": params}, x, t, y.astype(np.int32))
    assert got.shape == want.shape == (3, size, size, kw.get("out_channels", 8))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_load_from_state_dict_and_tree_matches_init():
    ref = _torch_dit()
    module, params = dit.load_diffusers(_state(ref), num_heads=2)
    x, t, y = _inputs(2, 8, 8, 4)
    init = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, y))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)
    got = jax.jit(module.apply)({"params": params}, x, t, y)
    np.testing.assert_allclose(np.asarray(got), _torch_forward(ref, x, t, y), atol=1e-4)


def test_load_rejects_bad_state_dicts():
    state = _state(_torch_dit())
    bad = dict(state)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    bad[key] = bad[key] + 1.0
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        dit.load_diffusers(bad, num_heads=2)
    with pytest.raises(UserError, match="unexpected"):
        dit.load_diffusers({**state, "encoder.conv_in.weight": np.zeros(3, np.float32)}, num_heads=2)
    with pytest.raises(UserError, match="num_heads"):
        dit.load_diffusers(state)
    missing = {k: v for k, v in state.items() if not k.startswith("proj_out_1")}
    with pytest.raises(UserError, match="proj_out_1"):
        dit.load_diffusers(missing, num_heads=2)


def test_scan_and_remat_equal_unrolled():
    ref = _torch_dit(num_layers=3)
    x, t, y = _inputs(2, 8, 8, 4)
    module, params = dit.load_diffusers(_state(ref), num_heads=2)
    want = np.asarray(jax.jit(module.apply)({"params": params}, x, t, y))
    smod, sparams = dit.load_diffusers(_state(ref), num_heads=2, scan=True, remat="full")
    assert sparams["blocks"]["attn"]["to_q"]["kernel"].shape == (3, 16, 2, 8)
    sparams = {"params": sparams}
    # the scanned init has the same tree as the converter's stacked params, with a "layers" axis
    init = jax.eval_shape(smod.init, jax.random.key(0), x, t, y)
    assert init["params"]["blocks"]["attn"]["to_q"]["kernel"].names == ("layers", "embed", "heads", "kv")
    assert jax.tree.map(np.shape, nn.unbox(init)) == jax.tree.map(np.shape, sparams)
    np.testing.assert_allclose(np.asarray(jax.jit(smod.apply)(sparams, x, t, y)), want, atol=1e-5)
    grad = jax.jit(jax.grad(lambda p: smod.apply(p, x, t, y).sum()))(sparams)  # remat under scan differentiates
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))


def test_init_is_zero_output_and_shapes_non_square():
    m = dit.DiT(patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    x = jnp.ones((2, 8, 12, 4))
    params = jax.jit(m.init)(jax.random.key(0), x, jnp.array([1, 2]), jnp.array([0, 3]))
    assert params["params"]["blocks_0"]["adaLN_modulation"]["kernel"].names == ("embed", "mlp")
    out = jax.jit(m.apply)(params, x, jnp.array([1, 2]), jnp.array([0, 3]))
    assert out.shape == (2, 8, 12, 8) and out.dtype == jnp.float32
    # adaLN-Zero: the final layer is zero-initialised, so a fresh model predicts exactly 0
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_label_dropout_and_force_drop():
    ref = _torch_dit()
    x, t, _ = _inputs(2, 8, 8, 4)
    y = np.array([1, 2], np.int32)
    m, params = dit.load_diffusers(_state(ref), num_heads=2)
    params = {"params": params}
    apply = jax.jit(m.apply, static_argnames="train")
    null = np.asarray(apply(params, x, t, np.full(2, 10, np.int32)))
    cond = np.asarray(apply(params, x, t, y))
    assert np.abs(null - cond).max() > 0.01
    forced = np.asarray(apply(params, x, t, y, force_drop_ids=np.array([1, 0])))
    np.testing.assert_allclose(forced[0], null[0], atol=1e-6)
    np.testing.assert_allclose(forced[1], cond[1], atol=1e-6)
    always = jax.jit(m.clone(class_dropout_prob=1.0).apply, static_argnames="train")
    dropped = always(params, x, t, y, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(np.asarray(dropped), null, atol=1e-6)
    np.testing.assert_allclose(np.asarray(always(params, x, t, y, train=False)), cond, atol=1e-6)


def test_bf16_close_to_f32():
    ref = _torch_dit()
    x, t, y = _inputs(2, 8, 8, 4)
    m, params = dit.load_diffusers(_state(ref), num_heads=2)
    params = {"params": params}
    y32 = np.asarray(jax.jit(m.apply)(params, x, t, y))
    y16 = np.asarray(jax.jit(m.clone(dtype=jnp.bfloat16).apply)(params, x, t, y))
    assert np.abs(y16 - y32).max() <= 0.05 * np.abs(y32).max()


@pytest.mark.parametrize("x_shape,t,y,match", [
    ((2, 8, 8, 3), [1, 2], [0, 1], "in_channels"),
    ((2, 8, 9, 4), [1, 2], [0, 1], "patch_size"),
    ((2, 8, 8, 4), [1, 2, 3], [0, 1], "t.shape"),
    ((2, 8, 8, 4), [1, 2], [[0, 1]], "y.shape"),
    ((8, 8, 4), [1, 2], [0, 1], "x.shape"),
])
def test_bad_input_raises(x_shape, t, y, match):
    m = dit.DiT(hidden_size=16, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(UserError, match=match):
        m.init(jax.random.key(0), jnp.zeros(x_shape), jnp.array(t), jnp.array(y))


def test_bad_variant_and_remat():
    with pytest.raises(UserError, match="variant"):
        dit.Model(variant="XXL/2")
    m = dit.Model(variant="S/8", remat="some")
    with pytest.raises(UserError, match="remat"):
        jax.eval_shape(m.init, jax.random.key(0), X, T, Y)


# --------------------------------------------------------------------------- text conditioning

def _text_dit(**kw):
    return dit.DiT(**{**dict(patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=0,
                             context_dim=6), **kw})


def _random_params(module, *args, seed=0, **kwargs):
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _text_inputs(b=2, s=5, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 8, 6, 4)).astype(np.float32)
    t = np.array([10.0, 700.0][:b], np.float32)
    text = rng.normal(size=(b, s, 6)).astype(np.float32)
    mask = np.ones((b, s), bool)
    mask[0, 3:] = False
    mask[1, 1:] = False
    return x, t, text, mask


def test_text_padding_never_influences_output_and_real_tokens_do():
    m = _text_dit()
    x, t, text, mask = _text_inputs()
    params = _random_params(m, x, t, text=text, text_mask=mask)
    apply = jax.jit(m.apply)
    base = np.asarray(apply(params, x, t, text=text, text_mask=mask))
    garbage = np.where(mask[..., None], text, 1e3).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(apply(params, x, t, text=garbage, text_mask=mask)), base)
    changed = text.copy()
    changed[0, 0] += 1.0  # a real token of example 0: changes example 0 only
    out = np.asarray(apply(params, x, t, text=changed, text_mask=mask))
    assert np.abs(out[0] - base[0]).max() > 1e-3
    np.testing.assert_array_equal(out[1], base[1])
    # the pooled vector is the masked mean unless given explicitly
    pooled = np.stack([text[i][mask[i]].mean(0) for i in range(2)])
    np.testing.assert_allclose(np.asarray(apply(params, x, t, text=text, text_mask=mask, text_pooled=pooled)),
                               base, atol=1e-5)


def test_text_null_dropout_and_fresh_cross_attention_is_zero():
    m = _text_dit(text_dropout_prob=1.0)
    x, t, text, mask = _text_inputs()
    init = jax.jit(m.init)(jax.random.key(0), x, t, text=text, text_mask=mask)["params"]
    to_out = nn.unbox(init)["blocks_0"]["cross_attn"]["to_out"]
    assert not np.asarray(to_out["kernel"]).any() and not np.asarray(to_out["bias"]).any()
    params = _random_params(m, x, t, text=text, text_mask=mask)
    null = params["params"]["text_embedder"]
    # the unconditional input by hand: null token first (the only valid one), null pooled vector
    null_text = np.broadcast_to(null["null_text"], text.shape).copy()
    null_mask = np.zeros_like(mask)
    null_mask[:, 0] = True
    pooled = np.broadcast_to(null["null_pooled"], (2, 6))
    apply = jax.jit(m.apply, static_argnames="train")
    want = np.asarray(apply(params, x, t, text=null_text, text_mask=null_mask, text_pooled=pooled))
    forced = np.asarray(apply(params, x, t, text=text, text_mask=mask, force_drop_ids=np.array([1, 0])))
    cond = np.asarray(apply(params, x, t, text=text, text_mask=mask))
    np.testing.assert_allclose(forced[0], want[0], atol=1e-6)
    np.testing.assert_allclose(forced[1], cond[1], atol=1e-6)
    assert np.abs(want - cond).max() > 1e-3
    dropped = apply(params, x, t, text=text, text_mask=mask, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(np.asarray(dropped), want, atol=1e-6)


def test_text_with_labels_and_scan_equal_unrolled():
    m = _text_dit(num_classes=10)
    x, t, text, mask = _text_inputs()
    y = np.array([3, 10], np.int32)
    params = _random_params(m, x, t, y, text=text, text_mask=mask)
    want = np.asarray(jax.jit(m.apply)(params, x, t, y, text=text, text_mask=mask))
    blocks = [params["params"].pop(f"blocks_{i}") for i in range(2)]
    params["params"]["blocks"] = jax.tree.map(lambda *a: np.stack(a), *blocks)
    got = jax.jit(m.clone(scan=True, remat="full").apply)(params, x, t, y, text=text, text_mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(), "text.shape"),                                          # context_dim set, text missing
    (dict(text=np.zeros((2, 5, 6), np.float32)), "text_mask"),         # text without its mask
    (dict(text=np.zeros((2, 5, 7), np.float32), text_mask=np.ones((2, 5))), "text.shape"),
    (dict(text=np.zeros((2, 5, 6), np.float32), text_mask=np.ones((2, 4))), "text_mask.shape"),
])
def test_text_bad_input_raises(kw, match):
    x, t, _, _ = _text_inputs()
    with pytest.raises(UserError, match=match):
        jax.eval_shape(_text_dit().init, jax.random.key(0), x, t, **kw)
    with pytest.raises(UserError, match="context_dim"):
        jax.eval_shape(dit.DiT(hidden_size=16, depth=1, num_heads=2, num_classes=10).init, jax.random.key(0), x, t,
                       np.zeros(2, np.int32), text=np.zeros((2, 5, 6)), text_mask=np.ones((2, 5)))


# --------------------------------------------------------------------------- packed (NaViT)

PACK_SHAPES = [(8, 6), (4, 4), (2, 10), (6, 2)]  # (H, W) images of mixed sizes and aspects


def _packed_case(seed=3, **kw):
    from genjax.data import packing

    m = dit.DiT(**{**dict(patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=5,
                          learn_sigma=True), **kw})
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in PACK_SHAPES]
    t = rng.uniform(0, 999, len(images)).astype(np.float32)
    y = rng.integers(0, 5, len(images)).astype(np.int32)
    batch = packing.pack([im[None] for im in images], seq_len=24, patch_size=(1, 2, 2), max_per_seq=3)
    params = _random_params(m, images[0][None], t[:1], y[:1])
    return m, params, images, t, y, batch


def _per_slot(batch, values, fill=0):
    index = batch["example_index"]
    out = np.full(index.shape + np.shape(values)[1:], fill, np.asarray(values).dtype)
    out[index >= 0] = np.asarray(values)[index[index >= 0]]
    return out


@pytest.mark.parametrize("kw", [{}, {"pos_embed_base_size": 4}])
def test_packed_equals_each_image_alone(kw):
    """NaViT packing is exact: every image of a packed batch gets what `__call__` gives it alone
    (to float32 rounding; with pos_embed_base_size the scaled positions are computed in float32 in
    the packed form and in float64 in `__call__`'s table: 1e-4)."""
    from genjax.data import packing

    m, params, images, t, y, batch = _packed_case(**kw)
    assert batch["tokens"].shape[0] >= 2 and (batch["segment_ids"] == 2).any()  # images share sequences
    out = jax.jit(lambda p, b, t, y: m.apply(p, b["tokens"], b["segment_ids"], b["positions"], t, y,
                                             example_shape=b["example_shape"], method="packed"))(
        params, batch, _per_slot(batch, t), _per_slot(batch, y))
    assert out.dtype == jnp.float32 and out.shape == (*batch["segment_ids"].shape, 2 * 2 * 6)
    np.testing.assert_array_equal(np.asarray(out)[batch["segment_ids"] == 0], 0.0)
    got = packing.unpack({**batch, "tokens": np.asarray(out), "video_shape": batch["video_shape"] * [1, 1, 1, 2]})
    for i, im in enumerate(images):
        want = np.asarray(m.apply(params, im[None], t[i:i + 1], y[i:i + 1]))[0]
        assert np.abs(want).max() > 0.1
        tol = 1e-4 if kw else 1e-5
        np.testing.assert_allclose(got[i][0], want, rtol=tol, atol=tol)


def test_packed_text_and_bad_input():
    from genjax.data import packing

    m = _text_dit(in_channels=3)
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(h, w, 3)).astype(np.float32) for h, w in PACK_SHAPES[:3]]
    t = np.array([5.0, 400.0, 900.0], np.float32)
    text = rng.normal(size=(3, 4, 6)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    batch = packing.pack([im[None] for im in images], seq_len=32, patch_size=(1, 2, 2), max_per_seq=3)
    params = _random_params(m, images[0][None], t[:1], text=text[:1], text_mask=mask[:1])
    out = m.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"], _per_slot(batch, t),
                  text=_per_slot(batch, text), text_mask=_per_slot(batch, mask, True), method="packed")
    got = packing.unpack({**batch, "tokens": np.asarray(out), "video_shape": batch["video_shape"] * [1, 1, 1, 2]})
    for i, im in enumerate(images):
        want = np.asarray(m.apply(params, im[None], t[i:i + 1], text=text[i:i + 1], text_mask=mask[i:i + 1]))[0]
        np.testing.assert_allclose(got[i][0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="tokens.shape"):
        m.apply(params, batch["tokens"][..., :5], batch["segment_ids"], batch["positions"], _per_slot(batch, t),
                text=_per_slot(batch, text), text_mask=_per_slot(batch, mask, True), method="packed")
    with pytest.raises(UserError, match="t.shape"):
        m.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"], t,
                text=_per_slot(batch, text), text_mask=_per_slot(batch, mask, True), method="packed")
    with pytest.raises(UserError, match="example_shape"):
        m.clone(pos_embed_base_size=4).apply(
            params, batch["tokens"], batch["segment_ids"], batch["positions"], _per_slot(batch, t),
            text=_per_slot(batch, text), text_mask=_per_slot(batch, mask, True), method="packed")
