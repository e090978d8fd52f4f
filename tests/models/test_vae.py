"""AutoencoderKL vs diffusers (random weights), posterior vs torch.distributions, losses vs numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import vae
from genjax.models.discriminator import (PatchDiscriminator, adaptive_disc_weight,
                                         discriminator_hinge_loss, generator_loss)
from genjax.models.vae import AutoencoderKL, DiagonalGaussian, load_diffusers, vae_loss

torch.set_num_threads(1)


def _diffusers_vae(**cfg):
    from diffusers import AutoencoderKL as TorchVAE
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    m = TorchVAE(down_block_types=("DownEncoderBlock2D",) * levels,
                 up_block_types=("UpDecoderBlock2D",) * levels, **cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # randomise everything, zero-initialised tensors included
            p.normal_(0, 0.1)
    return m


def _nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


CONFIGS = [
    dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=3, norm_num_groups=32,
         in_channels=1, out_channels=2, use_quant_conv=False, mid_block_add_attention=False),
]


def _load(cfg):
    tm = _diffusers_vae(**cfg)
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    module, params = load_diffusers(state, norm_num_groups=cfg["norm_num_groups"])
    return tm, module, params


def _encode_decode(module, params, x, z):
    @jax.jit
    def run(params, x, z):
        post = module.apply({"params": params}, x, method=module.encode)
        return post.mean, post.logvar, module.apply({"params": params}, z, method=module.decode)
    return run(params, x, z)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_diffusers(cfg):
    tm, module, params = _load(cfg)
    f = module.downsample_factor
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4 * f, 3 * f, tm.config.in_channels)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(2, 3, 5, cfg["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(_nchw(x)).latent_dist
        ref = _nhwc(dist.mean), _nhwc(dist.logvar), _nhwc(tm.decode(_nchw(z)).sample)
    mean, logvar, dec = _encode_decode(module, params, x, z)
    assert mean.shape == (2, 4, 3, cfg["latent_channels"]) and dec.shape == (2, 3 * f, 5 * f, tm.config.out_channels)
    for ours, theirs in zip((mean, logvar, dec), ref):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
    if cfg is CONFIGS[0]:  # bf16 compute with float32 params stays close to the reference
        outs16 = _encode_decode(module.clone(dtype=jnp.bfloat16), params, x, z)
        assert outs16[2].dtype == jnp.bfloat16
        for ours, theirs in zip(outs16, ref):
            err = np.max(np.abs(np.asarray(ours, np.float32) - theirs))
            assert err < 0.03 * np.max(np.abs(theirs)), err


@pytest.mark.slow  # heavy on 2 CPU cores; run by `make test-all`
def test_init_under_jit_gives_boxed_params():
    # small on purpose: compiling ~100 random initialisers dominates this test on CPU
    module = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, mid_block_attention=False,
                           use_quant_conv=False, use_post_quant_conv=False)
    x = jnp.zeros((1, 4, 6, 3))
    boxed = jax.jit(module.init)(jax.random.PRNGKey(0), x)
    kernel = boxed["params"]["encoder"]["conv_in"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, None, "conv_in", "conv_out")
    assert kernel.value.shape == (3, 3, 3, 8) and float(jnp.std(kernel.value)) > 0
    out = jax.eval_shape(lambda v: module.apply(v, x, sample_posterior=False)[0], boxed)  # boxed apply
    assert out.shape == x.shape


def test_sampling_and_latent_scaling():
    _, module, params = _load(CONFIGS[0])
    m = module.clone(scaling_factor=0.5, shift_factor=0.1)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32))
    key = jax.random.PRNGKey(3)

    @jax.jit
    def run(params, x, key):
        v = {"params": params}
        recon, post = module.apply(v, x, key)
        lat = m.apply(v, x, key, method=m.encode_latents)
        return recon, post, lat, m.apply(v, lat, method=m.decode_latents)

    recon, post, lat, back = run(params, x, key)
    assert recon.shape == x.shape and post.mean.shape == (2, 4, 6, 4)
    sample = post.mean + post.std * jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(np.asarray(post.sample(key)), np.asarray(sample), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lat), np.asarray((sample - 0.1) * 0.5), atol=1e-5)
    np.testing.assert_allclose(np.asarray(back), np.asarray(recon), atol=1e-4)
    with pytest.raises(UserError, match="rng"):
        module.apply({"params": params}, x)


def _count_diffusers_params(**cfg):
    from diffusers import AutoencoderKL as TorchVAE
    levels = len(cfg["block_out_channels"])
    with torch.device("meta"):
        m = TorchVAE(down_block_types=("DownEncoderBlock2D",) * levels,
                     up_block_types=("UpDecoderBlock2D",) * levels, **cfg)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("variant,count", [("sd", 83_653_863), ("mnist", None)])
def test_variant_param_counts(variant, count):
    kw = vae.VARIANTS[variant]
    module = vae.Model(variant=variant)
    f = module.downsample_factor
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, f, f, kw["in_channels"])))
    ours = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
    theirs = _count_diffusers_params(**kw)
    assert ours == theirs
    if count is not None:
        assert ours == count


def test_kl_and_nll_match_torch_distributions():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    m2, lv2 = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    post = DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32))
    other = DiagonalGaussian(jnp.asarray(m2, jnp.float32), jnp.asarray(lv2, jnp.float32))
    normal = torch.distributions.Normal
    q = normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar)))
    kl0 = torch.distributions.kl_divergence(q, normal(0.0, 1.0)).sum((1, 2, 3)).numpy()
    kl1 = torch.distributions.kl_divergence(q, normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2)))).sum((1, 2, 3)).numpy()
    x = rng.normal(size=mean.shape)
    nll = -q.log_prob(torch.tensor(x)).sum((1, 2, 3)).numpy()
    np.testing.assert_allclose(np.asarray(post.kl()), kl0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(post.kl(other)), kl1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(post.nll(jnp.asarray(x, jnp.float32))), nll, rtol=1e-5)
    clamped = DiagonalGaussian.from_moments(jnp.asarray([[[[0.0, 0.0, -50.0, 40.0]]]]))
    np.testing.assert_array_equal(np.asarray(clamped.logvar), [[[[-30.0, 20.0]]]])


def test_vae_loss_matches_direct_computation():
    rng = np.random.default_rng(0)
    x, recon = rng.uniform(-1, 1, (2, 4, 4, 3)), rng.uniform(-1, 1, (2, 4, 4, 3))
    mean, logvar = rng.normal(size=(2, 1, 1, 4)), rng.normal(size=(2, 1, 1, 4))
    post = DiagonalGaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum((1, 2, 3))
    percept = lambda a, b: jnp.mean(jnp.abs(a - b) ** 3, axis=(1, 2, 3))  # any (x, recon) -> (B,)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    loss, metrics = vae_loss(f32(recon), f32(x), post, kl_weight=0.1, rec="l1",
                             perceptual_fn=percept, perceptual_weight=2.0)
    p = np.mean(np.abs(x - recon) ** 3, axis=(1, 2, 3))
    expect = (np.abs(x - recon) + 2.0 * p[:, None, None, None]).sum() / 2 + 0.1 * kl.sum() / 2
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl.mean(), rtol=1e-5)
    loss2, _ = vae_loss(f32(recon), f32(x), post, kl_weight=1e-6, rec="l2")
    np.testing.assert_allclose(float(loss2), ((x - recon) ** 2).sum() / 2 + 1e-6 * kl.mean(), rtol=1e-5)
    with pytest.raises(UserError, match="rec"):
        vae_loss(f32(recon), f32(x), post, rec="l3")


def test_vae_loss_perceptual_term_on_videos():
    # (B, T, H, W, C): the per-example perceptual distance must broadcast over all non-batch axes.
    rng = np.random.default_rng(1)
    x, recon = rng.uniform(-1, 1, (3, 2, 4, 4, 1)), rng.uniform(-1, 1, (3, 2, 4, 4, 1))
    post = DiagonalGaussian(jnp.zeros((3, 1, 1, 1, 4)), jnp.zeros((3, 1, 1, 1, 4)))
    percept = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3, 4))
    loss, _ = vae_loss(jnp.asarray(recon, jnp.float32), jnp.asarray(x, jnp.float32), post,
                       rec="l2", perceptual_fn=percept, perceptual_weight=0.5)
    p = np.abs(x - recon).mean((1, 2, 3, 4))
    expect = ((x - recon) ** 2 + 0.5 * p[:, None, None, None, None]).sum() / 3
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


def test_gan_losses_and_adaptive_weight():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(2, 6, 6, 1)), rng.normal(size=(2, 6, 6, 1))
    expect = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    np.testing.assert_allclose(float(discriminator_hinge_loss(jnp.asarray(real), jnp.asarray(fake))), expect, rtol=1e-6)
    np.testing.assert_allclose(float(generator_loss(jnp.asarray(fake))), -fake.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(adaptive_disc_weight(3.0, 2.0, disc_weight=0.5)), 0.5 * 3.0 / (2.0 + 1e-4), rtol=1e-6)
    assert float(adaptive_disc_weight(1.0, 0.0)) == 1e4  # clipped
    assert float(jax.grad(lambda a: adaptive_disc_weight(a, 2.0))(3.0)) == 0.0


def _taming_nlayer(input_nc, ndf, n_layers):
    """taming-transformers NLayerDiscriminator (BatchNorm, no conv bias before a norm)."""
    tnn = torch.nn
    seq = [tnn.Conv2d(input_nc, ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        seq += [tnn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                tnn.BatchNorm2d(ndf * mult), tnn.LeakyReLU(0.2)]
    seq += [tnn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return tnn.Sequential(*seq)


def test_patch_discriminator_matches_taming_layout():
    torch.manual_seed(0)
    tm = _taming_nlayer(3, 8, 3).train()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.2)
    convs = [m for m in tm if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in tm if isinstance(m, torch.nn.BatchNorm2d)]
    params = {}
    for i, c in enumerate(convs):
        params[f"conv_{i}"] = {"kernel": jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0))}
        if c.bias is not None:
            params[f"conv_{i}"]["bias"] = jnp.asarray(c.bias.detach().numpy())
    for i, n in enumerate(norms, start=1):
        params[f"norm_{i}"] = {"scale": jnp.asarray(n.weight.detach().numpy()), "bias": jnp.asarray(n.bias.detach().numpy())}
    disc = PatchDiscriminator(ndf=8, n_layers=3)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda x: disc.init(jax.random.PRNGKey(0), x, train=False), jnp.asarray(x))
    assert jax.tree.map(jnp.shape, nn.unbox(shapes["params"])) == jax.tree.map(jnp.shape, params)
    stats = {k: {"mean": jnp.zeros(n.num_features), "var": jnp.ones(n.num_features)}
             for k, n in zip(sorted(shapes["batch_stats"]), norms)}
    out, updates = jax.jit(lambda v, x: disc.apply(v, x, train=True, mutable=["batch_stats"]))(
        {"params": params, "batch_stats": stats}, jnp.asarray(x))
    with torch.no_grad():
        ref = _nhwc(tm(_nchw(x)))
    assert out.shape == (2, 6, 4, 1)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["norm_3"]["mean"]),
                               norms[2].running_mean.numpy(), atol=1e-5)
    # a 70x70 PatchGAN maps 256x256 images to 30x30 logits (Isola et al. 2017)
    logits = jax.eval_shape(lambda v, x: disc.apply(v, x, train=False), shapes, jnp.zeros((1, 256, 256, 3)))
    assert logits.shape == (1, 30, 30, 1)


def test_bad_inputs_raise_user_error():
    module = AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(UserError, match="divisible by the downsampling factor 2"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 7, 3)))
    with pytest.raises(UserError, match="input channels"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(UserError, match="latent_channels"):
        module.apply(variables, jnp.zeros((1, 2, 2, 3)), method=module.decode)
    with pytest.raises(UserError, match="variant"):
        vae.Model(variant="xl")


def test_foreign_state_dict_raises_user_error():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    with pytest.raises(UserError, match="encoder.conv_in.weight"):
        load_diffusers({k: v.numpy() for k, v in unet.state_dict().items()})
    # a VAE state dict with one extra key, or one wrong shape, is refused too
    state = {k: v.numpy() for k, v in _diffusers_vae(**CONFIGS[0]).state_dict().items()}
    with pytest.raises(UserError, match="time_embedding"):
        load_diffusers({**state, "time_embedding.linear_1.weight": np.zeros((4, 4))}, norm_num_groups=8)
    with pytest.raises(UserError, match="quant_conv"):
        load_diffusers({**state, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}, norm_num_groups=8)


def test_attention_impl_blockwise_equals_xla():
    """`attention_impl` reaches the encoder's and decoder's mid-block attention (an unknown name
    raises) and "blockwise" gives the numbers of "xla"."""
    module = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 6, 3)).astype(np.float32))
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x))  # random init compiles slowly
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    out = {}
    for impl in ("xla", "blockwise"):
        recon, post = module.clone(attention_impl=impl).apply(variables, x, sample_posterior=False)
        out[impl] = (np.asarray(recon), np.asarray(post.mean))
    assert np.abs(out["xla"][0]).max() > 1e-3
    for got, want in zip(out["blockwise"], out["xla"]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="attention_impl"):
        jax.eval_shape(lambda v: module.clone(attention_impl="flash").apply(v, x, sample_posterior=False), variables)
