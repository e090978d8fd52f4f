"""Causal video VAE: CausalConv3d vs torch conv3d, causality by perturbation, exact inflation from
the 2D AutoencoderKL, parameter counts vs diffusers' 2D model, Moving MNIST training, user errors.

Params are numpy-random (XLA:CPU compiles `init`'s random initialisers slowly), and the jitted
functions are shared across tests so that each model shape compiles once.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from genjax.data.sources import MovingMnistSource
from genjax.errors import UserError
from genjax.models import vae, video_vae
from genjax.models.causal_conv import CausalConv3d
from genjax.models.video_vae import VideoAutoencoderKL, inflate_from_2d

torch.set_num_threads(1)

# 3 levels: 4x spatial, 4x temporal (two temporal downsamples), tiny widths.
SMALL_2D = dict(in_channels=2, out_channels=2, block_out_channels=(8, 16, 16), layers_per_block=1,
                latent_channels=3, norm_num_groups=4)
SMALL = VideoAutoencoderKL(**SMALL_2D, temporal_downsample=(True, True))


def _random_params(module, x, std=None, seed=0):
    """numpy-random params in the tree of `nn.unbox(module.init(...)["params"])`; std=None gives a
    trainable init (kernels N(0, 1/fan_in), zero biases, unit norm scales)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if std is not None:
            return jnp.asarray(rng.normal(0, std, s.shape).astype(np.float32))
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32))
        return jnp.ones(s.shape) if "scale" in name else jnp.zeros(s.shape)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def _video(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _roundtrip(module, params, x):
    """(posterior mean, logvar, decode(mode)) of `module` on `x`."""
    recon, post = module.apply({"params": params}, x, sample_posterior=False)
    return post.mean, post.logvar, recon


# --------------------------------------------------------------------------- CausalConv3d


def _torch_causal_conv(x, kernel, bias, strides, spatial_padding, replicate):
    """Reference: pad the past with copies of frame 0 (or zeros) then torch conv3d."""
    xt = torch.from_numpy(np.asarray(x).transpose(0, 4, 1, 2, 3).copy())
    kt = kernel.shape[0]
    first = xt[:, :, :1] if replicate else torch.zeros_like(xt[:, :, :1])
    xt = torch.cat([first] * (kt - 1) + [xt], dim=2)
    (top, bottom), (left, right) = spatial_padding
    xt = torch.nn.functional.pad(xt, (left, right, top, bottom))
    w = torch.from_numpy(np.asarray(kernel).transpose(4, 3, 0, 1, 2).copy())
    y = torch.nn.functional.conv3d(xt, w, torch.from_numpy(np.array(bias)), stride=strides)
    return y.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("kernel_size,strides,spatial_padding,temporal_padding", [
    ((3, 3, 3), (1, 1, 1), None, "replicate"),
    ((3, 3, 3), (2, 2, 2), ((0, 1), (0, 1)), "replicate"),
    ((2, 1, 3), (1, 1, 1), ((0, 0), (1, 1)), "zeros"),
])
def test_causal_conv3d_matches_torch_and_is_causal(kernel_size, strides, spatial_padding, temporal_padding):
    conv = CausalConv3d(5, kernel_size, strides=strides, spatial_padding=spatial_padding,
                        temporal_padding=temporal_padding)
    x = _video((2, 7, 6, 8, 3))
    params = _random_params(conv, x, std=0.3)
    apply = jax.jit(lambda x: conv.apply({"params": params}, x))
    y = np.asarray(apply(x))
    kh, kw = kernel_size[1:]
    pad = spatial_padding or ((kh // 2, kh // 2), (kw // 2, kw // 2))
    ref = _torch_causal_conv(x, params["kernel"], params["bias"], strides, pad, temporal_padding == "replicate")
    assert y.shape == ref.shape and y.shape[1] == (7 - 1) // strides[0] + 1
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
    st = strides[0]
    for t in range(7):  # output frame j depends on input frames <= st * j only
        y2 = np.asarray(apply(x.at[:, t + 1:].add(1.0)))
        keep = t // st + 1
        np.testing.assert_array_equal(y2[:, :keep], y[:, :keep])
        if keep < y.shape[1]:
            assert not np.allclose(y2[:, keep:], y[:, keep:])


# --------------------------------------------------------------------------- shapes, counts


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes(frames):
    x = jnp.zeros((2, frames, 12, 8, 2))
    params = jax.eval_shape(lambda: _random_params(SMALL, jnp.zeros((1, 1, 4, 4, 2))))
    mean, logvar, recon = jax.eval_shape(functools.partial(_roundtrip, SMALL), params, x)
    latent_frames = 1 + (frames - 1) // 4
    assert mean.shape == logvar.shape == (2, latent_frames, 3, 2, 3) and mean.dtype == jnp.float32
    assert recon.shape == x.shape


def _diffusers_param_count(kt, **cfg):
    """diffusers AutoencoderKL's parameter count plus (kt - 1) extra taps of every 3x3 kernel."""
    from diffusers import AutoencoderKL as TorchVAE
    levels = len(cfg["block_out_channels"])
    with torch.device("meta"):
        m = TorchVAE(down_block_types=("DownEncoderBlock2D",) * levels,
                     up_block_types=("UpDecoderBlock2D",) * levels, **cfg)
    extra = sum(c.weight.numel() for c in m.modules()
                if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3))
    return sum(p.numel() for p in m.parameters()) + (kt - 1) * extra


@pytest.mark.parametrize("variant,count,factors", [("sd-inflated", 245_979_879, (8, 4)), ("tiny", 496_269, (4, 4))])
def test_variant_param_counts(variant, count, factors):
    kw = video_vae.VARIANTS[variant]
    module = video_vae.Model(variant=variant)
    fs, ft = module.downsample_factor, module.temporal_downsample_factor
    x = jnp.zeros((1, 1 + ft, 2 * fs, 3 * fs, kw["in_channels"]))
    (recon, post), shapes = jax.eval_shape(module.init_with_output, jax.random.PRNGKey(0), x)
    assert recon.shape == x.shape and post.mean.shape == (1, 2, 2, 3, kw["latent_channels"])
    assert (fs, ft) == factors
    ours = sum(s.size for s in jax.tree.leaves(nn.unbox(shapes)))
    cfg = {k: v for k, v in kw.items() if k != "temporal_downsample"}
    assert ours == _diffusers_param_count(module.temporal_kernel_size, **cfg)
    assert ours == count
    kernel = shapes["params"]["encoder"]["conv_in"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, None, None, "conv_in", "conv_out")


def test_init_under_jit():
    module = VideoAutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(4, 4),
                                layers_per_block=1, latent_channels=2, norm_num_groups=2,
                                mid_block_attention=False, use_quant_conv=False,
                                use_post_quant_conv=False, temporal_downsample=(True,))
    x = jnp.zeros((1, 3, 4, 4, 1))
    boxed = jax.jit(module.init)(jax.random.key(0, impl="rbg"), x)
    kernel = boxed["params"]["decoder"]["up_blocks_0_upsamplers_0"]["conv"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.value.shape == (3, 3, 3, 4, 4)
    assert float(jnp.std(kernel.value)) > 0


# --------------------------------------------------------------------------- inflation, causality


@functools.lru_cache(maxsize=None)
def _inflated():
    """A random 2D AutoencoderKL (every param random, zero-initialised ones included) inflated."""
    module_2d = vae.AutoencoderKL(**SMALL_2D)
    params_2d = _random_params(module_2d, jnp.zeros((1, 4, 4, 2)), std=0.2, seed=1)
    module, params = inflate_from_2d(params_2d, module_2d, temporal_downsample=(True, True))
    return module_2d, params_2d, module, params


@functools.partial(jax.jit, static_argnums=0)
def _roundtrip_2d(module, params, x):
    post = module.apply({"params": params}, x, method=module.encode)
    return post.mean, post.logvar, module.apply({"params": params}, post.mean, method=module.decode)


X = _video((2, 9, 12, 8, 2))  # one shape for the model tests below: each compiles once


def test_inflation_matches_2d_vae():
    module_2d, params_2d, module, params = _inflated()
    assert module == SMALL
    x = X
    ref = [np.asarray(a) for a in _roundtrip_2d(module_2d, params_2d, x.reshape(18, 12, 8, 2))]
    ref = [a.reshape((2, 9) + a.shape[1:]) for a in ref]
    mean1, logvar1, recon1 = _roundtrip(module, params, x[:, :1])  # a 1-frame video == the image
    for ours, theirs in zip((mean1, logvar1, recon1), ref):
        np.testing.assert_allclose(np.asarray(ours)[:, 0], theirs[:, 0], atol=1e-5, rtol=0)
    # 9 frames: latent j is the 2D latent of frame 4j; decoded frame t the 2D round trip of
    # frame 4 * ceil(t / 4) (current-frame-only kernels, subsampling down, repeating up)
    mean, logvar, recon = _roundtrip(module, params, x)
    np.testing.assert_allclose(np.asarray(mean), ref[0][:, ::4], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), ref[1][:, ::4], atol=1e-5, rtol=0)
    source = 4 * np.ceil(np.arange(9) / 4).astype(int)
    np.testing.assert_allclose(np.asarray(recon), ref[2][:, source], atol=1e-5, rtol=0)
    # boxed 2D params (as `init` returns them) inflate the same
    boxed = jax.tree.map(lambda a: nn.Partitioned(a, (None,) * a.ndim), params_2d)
    again = inflate_from_2d(boxed, {k: v for k, v in SMALL_2D.items()}, temporal_downsample=(True, True))[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), again, params))


def test_encode_decode_is_causal_per_latent_chunk():
    params = _random_params(SMALL, jnp.zeros((1, 1, 4, 4, 2)), std=0.2, seed=2)
    x = X
    mean, _, recon = (np.asarray(a) for a in _roundtrip(SMALL, params, x))
    for t in (0, 4):  # chunk ends: decoded frames <= t ignore input frames > t, exactly
        mean2, _, recon2 = (np.asarray(a) for a in _roundtrip(SMALL, params, x.at[:, t + 1:].multiply(-1)))
        np.testing.assert_array_equal(mean2[:, :t // 4 + 1], mean[:, :t // 4 + 1])
        np.testing.assert_array_equal(recon2[:, :t + 1], recon[:, :t + 1])
        assert not np.allclose(recon2[:, t + 1:], recon[:, t + 1:])
    # inside a chunk frames share a latent: frame 1 is decoded from latent 1, which saw frame 4
    _, _, recon3 = (np.asarray(a) for a in _roundtrip(SMALL, params, x.at[:, 4].multiply(-1)))
    np.testing.assert_array_equal(recon3[:, :1], recon[:, :1])
    assert not np.allclose(recon3[:, 1], recon[:, 1])
    # an image is a 1-frame video: the first frame alone gives the video's first latent and frame
    mean1, _, recon1 = (np.asarray(a) for a in _roundtrip(SMALL, params, x[:, :1]))
    np.testing.assert_allclose(mean1, mean[:, :1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(recon1, recon[:, :1], atol=1e-5, rtol=0)


def test_bf16_close_to_float32():
    _, _, module, params = _inflated()
    ref = _roundtrip(module, params, X)
    out = _roundtrip(module.clone(dtype=jnp.bfloat16), params, X)
    assert out[2].dtype == jnp.bfloat16 and out[0].dtype == jnp.float32
    for ours, theirs in zip(out, ref):
        theirs = np.asarray(theirs)
        err = np.max(np.abs(np.asarray(ours, np.float32) - theirs))
        assert err < 0.03 * np.max(np.abs(theirs)), err


# --------------------------------------------------------------------------- training


def _train_rec_losses(module, frames, steps, seed=0):
    """Per-step mean |x - recon| of `steps` Adam steps (lr 3e-3, `vae.vae_loss`, sampled
    posterior) on 2 Moving MNIST clips of `frames` 32x32 frames, in one jitted scan."""
    source = MovingMnistSource(num_examples=2, num_frames=frames, image_size=32, seed=seed)
    x = jnp.asarray(np.stack([source[i]["video"] for i in range(2)]).astype(np.float32) / 127.5 - 1.0)
    params = _random_params(module, x[:1])
    opt = optax.adam(3e-3)

    # conftest compiles at XLA:CPU backend optimisation level 0 (cheap compiles); this program runs
    # long enough that level 2 pays for itself (~15x faster convolution gradients)
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 2})
    def train(params, key):
        def step(carry, key):
            params, opt_state = carry

            def loss_fn(p):
                recon, post = module.apply({"params": p}, x, key)
                return vae.vae_loss(recon, x, post, kl_weight=1e-6)

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics["rec_loss"]

        return jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))[1]

    rec = np.asarray(train(params, jax.random.key(seed, impl="rbg")))
    assert np.all(np.isfinite(rec))
    return rec


def test_train_sanity_on_moving_mnist():
    # 2 levels (2x spatial, 2x temporal), no attention: the cheapest compile that still trains
    module = VideoAutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, latent_channels=3, norm_num_groups=4,
                                mid_block_attention=False, temporal_downsample=(True,))
    rec = _train_rec_losses(module, frames=3, steps=12)
    assert rec[-3:].mean() < rec[0] / 2, rec


@pytest.mark.slow
def test_trains_on_moving_mnist():
    module = VideoAutoencoderKL(**{**SMALL_2D, "in_channels": 1, "out_channels": 1},
                                temporal_downsample=(True, True))
    rec = _train_rec_losses(module, frames=5, steps=100)  # 2 latent frames of 8x8
    assert rec[-5:].mean() < rec[0] / 3, rec[::10]


# --------------------------------------------------------------------------- user errors


def test_bad_inputs_raise_user_error():
    params = jax.eval_shape(lambda: _random_params(SMALL, jnp.zeros((1, 1, 4, 4, 2))))
    shape = functools.partial(jax.eval_shape, functools.partial(_roundtrip, SMALL), params)
    with pytest.raises(UserError, match=r"x.shape\[1\]=4: the frame count T must be 1 \+ k \* 4"):
        shape(jnp.zeros((1, 4, 8, 8, 2)))
    with pytest.raises(UserError, match="divisible by the spatial downsampling factor 4"):
        shape(jnp.zeros((1, 5, 8, 6, 2)))
    with pytest.raises(UserError, match="input channels"):
        shape(jnp.zeros((1, 5, 8, 8, 3)))
    with pytest.raises(UserError, match=r"must be \(B, T, H, W, C\)"):
        shape(jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(UserError, match="latent_channels"):
        jax.eval_shape(lambda p, z: SMALL.apply({"params": p}, z, method=SMALL.decode),
                       params, jnp.zeros((1, 2, 2, 2, 4)))
    with pytest.raises(UserError, match="temporal_downsample"):
        jax.eval_shape(SMALL.clone(temporal_downsample=(True,)).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 1, 4, 4, 2)))
    with pytest.raises(UserError, match="temporal_padding"):
        jax.eval_shape(SMALL.clone(temporal_padding="reflect").init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 1, 4, 4, 2)))
    with pytest.raises(UserError, match="variant"):
        video_vae.Model(variant="huge")
    with pytest.raises(UserError, match="inflate_from_2d argument"):
        inflate_from_2d({}, SMALL_2D, temporal_stride=2)
    with pytest.raises(UserError, match="params_2d"):
        inflate_from_2d({"encoder": {}}, SMALL_2D)
