"""Wan 2.1 VAE vs diffusers AutoencoderKLWan (random weights, tiny config); chunked == whole video."""

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import wan_vae

torch.set_num_threads(1)

# 3 levels: a spatial-only then a space-time downsample (Wan 2.1's order), so both Resample kinds
# run in the encoder and decoder; fs = 4, ft = 2: 9 frames of 16x16 -> 5 latents of 4x4.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
TINY_KW = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(False, True),
               latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 2.0, 0.5, 1.0))


def _ncthw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 4, 1, 2, 3).copy())


def _nthwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers model, its folder, our module, params, x, z, diffusers' outputs, our whole-video
    outputs): encode(x) mean / std, decode(z)."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    tm = AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for p in tm.parameters():  # no zero-init (biases) or unit-init (gammas) hides a bug
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("wan_vae")
    tm.save_pretrained(folder)
    module, params = wan_vae.load_diffusers(folder)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(1, 5, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(_ncthw(x)).latent_dist
        ref = dict(mean=_nthwc(dist.mean), std=_nthwc(dist.std), dec=_nthwc(tm.decode(_ncthw(z)).sample))
    post, dec = jax.jit(lambda p, x, z: (module.apply({"params": p}, x, method="encode"),
                                         module.apply({"params": p}, z, method="decode")))(params, x, z)
    whole = dict(mean=np.asarray(post.mean), std=np.asarray(post.std), dec=np.asarray(dec))
    return tm, folder, module, params, x, z, ref, whole


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_matches_diffusers(wan):
    *_, ref, whole = wan
    assert whole["mean"].shape == (1, 5, 4, 4, 4) and whole["dec"].shape == (1, 9, 16, 16, 3)
    assert np.mean(np.abs(ref["dec"]) < 1) > 0.9  # the [-1, 1] clamp hides little of the comparison
    errs = {k: _err(whole[k], ref[k]) for k in ref}
    assert max(errs.values()) < 1e-4, errs


# diffusers' own schedule through the "cache" collection (encode: frame 0, then ft frames; decode:
# one latent frame at a time; every chunk after the first in the lax.scan) equals the whole video.


def test_chunked_encode_equals_whole_and_diffusers(wan):
    _, _, module, params, x, _, ref, whole = wan
    post = jax.jit(partial(wan_vae.encode_chunked, module))(params, x)
    assert _err(post.mean, whole["mean"]) < 1e-5 and _err(post.std, whole["std"]) < 1e-5
    assert _err(post.mean, ref["mean"]) < 1e-4 and _err(post.std, ref["std"]) < 1e-4


def test_chunked_decode_equals_whole_and_diffusers(wan):
    _, _, module, params, _, z, ref, whole = wan
    dec = jax.jit(partial(wan_vae.decode_chunked, module))(params, z)
    assert _err(dec, whole["dec"]) < 1e-5 and _err(dec, ref["dec"]) < 1e-4


@pytest.mark.slow
def test_chunked_other_chunk_sizes_and_images(wan):
    """Chunks of several frames and a shorter last chunk (outside the scan) give the same numbers;
    a 1-frame video (an image) is its own first chunk, and init from one frame has every param."""
    tm, _, module, params, x, z, ref, _ = wan
    post = jax.jit(partial(wan_vae.encode_chunked, module, frames_per_chunk=6))(params, x)  # 1 + 6 + 2
    dec = jax.jit(partial(wan_vae.decode_chunked, module, latents_per_chunk=3))(params, z)  # 1 + 3 + 1
    assert _err(post.mean, ref["mean"]) < 1e-4 and _err(dec, ref["dec"]) < 1e-4
    img = module.apply({"params": params}, x[:, :1], method="encode").mean
    with torch.no_grad():
        img_ref = _nthwc(tm.encode(_ncthw(x[:, :1])).latent_dist.mean)
    assert img.shape == (1, 1, 4, 4, 4) and _err(img, img_ref) < 1e-4
    init = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), x[:, :1]))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)


@pytest.mark.slow
def test_chunked_decode_memory_is_bounded(wan):
    """XLA's temp buffers of decode_chunked barely grow from 5 to 17 latent frames (measured 3.8 ->
    4.5 MB; the whole-video decode: 8.4 -> 30.2 MB): one chunk's activations, plus the output."""
    _, _, module, params, *_ = wan
    temp = [jax.jit(partial(wan_vae.decode_chunked, module)).lower(params, jnp.zeros((1, t, 16, 16, 4)))
            .compile().memory_analysis().temp_size_in_bytes for t in (5, 17)]
    assert temp[1] < 1.5 * temp[0], temp


@pytest.mark.slow
def test_other_config_matches_diffusers():
    """decoder_base_dim, 2 res blocks, other channel counts, batch 2 (weights as a state dict)."""
    from diffusers import AutoencoderKLWan
    cfg = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2], num_res_blocks=2,
               temperal_downsample=[True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4, in_channels=2, out_channels=1)
    torch.manual_seed(1)
    tm = AutoencoderKLWan(**cfg).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = {**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()},
          "temporal_downsample": (True,)}
    del kw["temperal_downsample"]
    module, params = wan_vae.load_diffusers(tm.state_dict(), **kw)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 8, 8, 2)).astype(np.float32)
    with torch.no_grad():
        mean = _nthwc(tm.encode(_ncthw(x)).latent_dist.mean)
        dec = _nthwc(tm.decode(_ncthw(mean)).sample)
    ours = module.apply({"params": params}, x, method="encode").mean
    assert ours.shape == (2, 3, 4, 4, 4) and _err(ours, mean) < 1e-4
    assert _err(module.apply({"params": params}, jnp.asarray(mean), method="decode"), dec) < 1e-4


def test_latent_scaling_and_input_errors(wan):
    _, _, module, params, x, z, *_ = wan
    zl = jnp.asarray(z)
    scaled = module.apply({"params": params}, zl, method=lambda m, z: (z - m.shift_factor) * m.scaling_factor)
    np.testing.assert_allclose(scaled, (z - np.array(TINY["latents_mean"])) / np.array(TINY["latents_std"]),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match=r"x.shape\[1\]=8"):  # T must be 1 + 2k
        module.apply({"params": params}, x[:, :8], method="encode")
    with pytest.raises(UserError, match="frames_per_chunk=3"):
        wan_vae.encode_chunked(module, params, x, frames_per_chunk=3)
    with pytest.raises(UserError, match="z.shape"):
        wan_vae.decode_chunked(module, params, z[..., :3])


def test_load_errors(wan):
    tm, folder, *_ = wan
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    with pytest.raises(UserError, match="decoder.conv_out.bias.*missing"):
        wan_vae.load_diffusers({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, **TINY_KW)
    with pytest.raises(UserError, match="extra.weight.*unexpected"):
        wan_vae.load_diffusers({**state, "extra.weight": np.zeros(3)}, **TINY_KW)
    with pytest.raises(UserError, match="AutoencoderKLWan param .*conv_in"):
        bad = {**state, "encoder.conv_in.weight": np.zeros((8, 3, 3, 3, 5), np.float32)}
        wan_vae.load_diffusers(bad, **TINY_KW)
    with pytest.raises(UserError, match="override"):
        wan_vae.load_diffusers(state, bogus=1, **TINY_KW)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_residual": True}))
    try:
        with pytest.raises(UserError, match="config is_residual=True"):
            wan_vae.load_diffusers(folder)
    finally:
        (folder / "config.json").write_text(json.dumps(config))


def test_param_count_matches_diffusers_wan21():
    """The published Wan 2.1 config: our init's shapes (no compute) vs diffusers on the meta device."""
    from diffusers import AutoencoderKLWan
    with torch.device("meta"):
        ref = sum(p.numel() for p in AutoencoderKLWan().parameters())
    module = wan_vae.Model(variant="wan2.1")
    shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 8, 8, 3))))["params"])
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert ours == ref == 126_892_531
