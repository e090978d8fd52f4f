"""genjax.models.layers against diffusers / torch references and exact packing identities."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import layers

torch.set_num_threads(1)


@pytest.mark.parametrize("dim,flip,shift", [(256, True, 0.0), (256, True, 1.0), (64, False, 1.0), (33, True, 0.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    ours = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == (4, dim) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4)  # float32 sin of args up to ~1e3


@pytest.mark.parametrize("grid,base", [((4, 4), None), ((3, 5), None), ((6, 2), 4), ((8, 8), 4)])
def test_sincos_2d_matches_diffusers(grid, base):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    d = 32
    # diffusers scales positions by base_size / grid; base_size = grid side gives plain arange.
    ref = get_2d_sincos_pos_embed(d, grid, base_size=base if base else grid[0], output_type="pt").numpy()
    if base is None and grid[0] != grid[1]:  # diffusers' shared base_size rescales w; MAE does not
        ref = None
    ours = layers.sincos_pos_embed_2d(d, *grid, base_size=base)
    assert ours.shape == (grid[0] * grid[1], d) and ours.dtype == np.float32
    if ref is not None:
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    # MAE re-derivation: token h * W + w; first half encodes w, second half h.
    h, w = grid
    scale_h, scale_w = (base / h, base / w) if base else (1.0, 1.0)
    for idx in [0, w - 1, (h - 1) * w, h * w - 1]:
        hi, wi = divmod(idx, w)
        omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
        ew, eh = wi * scale_w * omega, hi * scale_h * omega
        want = np.concatenate([np.sin(ew), np.cos(ew), np.sin(eh), np.cos(eh)])
        np.testing.assert_allclose(ours[idx], want, atol=1e-6)


def test_patchify_roundtrip_and_dit_order():
    x = jax.random.normal(jax.random.key(0), (2, 6, 10, 3))
    tok = layers.patchify(x, (2, 5))
    assert tok.shape == (2, 3 * 2, 2 * 5 * 3)
    np.testing.assert_array_equal(np.asarray(layers.unpatchify(tok, (3, 2), (2, 5))), np.asarray(x))
    # DiT's torch unpatchify: (n, h, w, p, q, c) -einsum nhwpqc->nchpwq-> (n, c, h*p, w*q).
    t = torch.from_numpy(np.array(tok)).reshape(2, 3, 2, 2, 5, 3)
    ref = torch.einsum("nhwpqc->nchpwq", t).reshape(2, 3, 6, 10).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ref, np.asarray(x))


def test_patchify_rejects_indivisible():
    with pytest.raises(UserError, match="patch size"):
        layers.patchify(jnp.zeros((1, 6, 7, 3)), (2, 2))
    with pytest.raises(UserError, match="patch size"):
        layers.PatchEmbed(8, (2, 2)).init(jax.random.key(0), jnp.zeros((1, 5, 4, 3)))


def test_patch_embed_matches_torch_conv():
    m = layers.PatchEmbed(8, (2, 3))
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 5)).astype(np.float32)
    params = _random_params(m, x)
    k, bias = params["params"]["proj"]["kernel"], params["params"]["proj"]["bias"]  # (2, 3, 5, 8), (8,)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.array(k)).permute(3, 2, 0, 1),
                                     torch.from_numpy(bias), stride=(2, 3))
    ref = ref.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(m.apply(params, x)), ref, atol=1e-5)


def _random_params(m, *args, seed=0):
    """Params with init's tree, all entries (biases too) drawn N(0, 0.3) with numpy: no RNG compiles."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), *args))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def test_attention_packed_equals_each_segment_alone():
    m = layers.Attention(num_heads=2, head_dim=4)
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
    m = layers.Attention(num_heads=2)
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
    m = layers.Attention(num_heads=3, head_dim=5)
    got = m.apply(params, x, ctx, context_mask=keep)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_attention_bf16_close_and_logical_axes():
    x = np.random.default_rng(3).normal(size=(2, 5, 16)).astype(np.float32)
    m32 = layers.Attention(num_heads=4)
    boxed = jax.eval_shape(m32.init, jax.random.key(0), x)["params"]
    assert isinstance(boxed["to_q"]["kernel"], nn.Partitioned)
    assert boxed["to_q"]["kernel"].names == ("embed", "heads", "kv")
    assert boxed["to_out"]["kernel"].names == ("heads", "kv", "embed")
    params = _random_params(m32, x)
    y32 = jax.jit(m32.apply)(params, x)
    y16 = jax.jit(layers.Attention(num_heads=4, dtype=jnp.bfloat16).apply)(params, x)
    assert y16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() <= 0.03 * np.abs(np.asarray(y32)).max()


def test_mlp_and_timestep_embedder_shapes():
    x = jnp.ones((2, 3, 8))
    m = layers.Mlp(hidden_features=32)
    assert jax.eval_shape(m.apply, _random_params(m, x), x).shape == (2, 3, 8)
    e = layers.TimestepEmbedder(16)
    t = jnp.array([1, 500])
    assert jax.eval_shape(e.apply, _random_params(e, t), t).shape == (2, 16)


def test_attention_bad_mask_shape():
    m = layers.Attention(num_heads=2)
    x = jnp.ones((2, 5, 8))
    p = _random_params(m, x)
    with pytest.raises(UserError, match="segment_ids.shape"):
        m.apply(p, x, segment_ids=jnp.ones((2, 4), jnp.int32))
