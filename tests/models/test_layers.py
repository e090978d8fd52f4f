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


def test_mlp_and_timestep_embedder_shapes():
    x = jnp.ones((2, 3, 8))
    m = layers.Mlp(hidden_features=32)
    assert jax.eval_shape(m.apply, _random_params(m, x), x).shape == (2, 3, 8)
    e = layers.TimestepEmbedder(16)
    t = jnp.array([1, 500])
    assert jax.eval_shape(e.apply, _random_params(e, t), t).shape == (2, 16)
