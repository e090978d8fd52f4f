"""2D KL autoencoder of latent diffusion (LDM / Stable Diffusion `AutoencoderKL`).

Source: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), Sec. 3.1 and Appendix G; the architecture, parameter names and numbers
match diffusers 0.42 `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`
Encoder / Decoder / DiagonalGaussianDistribution), as in stabilityai/sd-vae-ft-ema. The training
losses follow taming-transformers / LDM `LPIPSWithDiscriminator` and `NLayerDiscriminator`
(Esser et al. 2021, "Taming Transformers", eq. 4-7; Isola et al. 2017 PatchGAN).

Images are `(B, H, W, C)` float in [-1, 1]; latents are `(B, H/f, W/f, latent_channels)` with
f = 2 ** (len(block_out_channels) - 1) (8 for SD). Diffusion models see
`(z - shift_factor) * scaling_factor` (`encode_latents` / `decode_latents`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.io.weights import StateDictReader, load_state_dict
from genjax.models.conv import (Downsample, ResnetBlock, SpatialAttention, Upsample, conv2d,
                                group_norm, load_attention, load_downsample, load_resnet,
                                load_upsample)
from genjax.parallel.axes import CONV_IN, CONV_OUT

Dtype = Any
EPS = 1e-6  # every GroupNorm of the LDM autoencoder


# --------------------------------------------------------------------------- posterior


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) of the KL autoencoder.

    Fields `mean`, `logvar`: `(B, h, w, c)` float. Build it with `from_moments`, which clamps
    logvar to [-30, 20] as LDM / diffusers `DiagonalGaussianDistribution`. A pytree: it can be
    returned from `jit`.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """`moments (..., 2c)` = concat(mean, logvar) on the last axis -> posterior."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised sample `mean + std * eps`, eps ~ N(0, I) (Kingma & Welling 2014)."""
        eps = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other), other = N(0, I) by default, summed over all but the batch axis.

        Returns float32 `(B,)`, `0.5 * sum(mu^2 + var - 1 - logvar)` for the standard normal.
        """
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        if other is None:
            terms = mean ** 2 + jnp.exp(logvar) - 1.0 - logvar
        else:
            omean, ologvar = other.mean.astype(jnp.float32), other.logvar.astype(jnp.float32)
            terms = ((mean - omean) ** 2 / jnp.exp(ologvar) + jnp.exp(logvar - ologvar)
                     - 1.0 - logvar + ologvar)
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-density of `sample` (same shape as mean), summed per example: float32 `(B,)`."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        terms = np.log(2.0 * np.pi) + logvar + (sample.astype(jnp.float32) - mean) ** 2 / jnp.exp(logvar)
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


# --------------------------------------------------------------------------- encoder / decoder


class MidBlock(nn.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution (diffusers `UNetMidBlock2D`
    with one layer, `temb_channels=None`, single-head attention). `(B, h, w, C) -> (B, h, w, C)`."""
    norm_num_groups: int = 32
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ResnetBlock(num_groups=self.norm_num_groups, eps=EPS, name="resnets_0", **kw)(h)
        if self.attention:
            h = SpatialAttention(num_groups=self.norm_num_groups, eps=EPS, name="attentions_0", **kw)(h)
        return ResnetBlock(num_groups=self.norm_num_groups, eps=EPS, name="resnets_1", **kw)(h)


class Encoder(nn.Module):
    """LDM encoder: conv_in -> [resnets (+ downsample)] per level -> mid block -> norm, SiLU, conv_out.

    `(B, H, W, C_in) -> (B, H/f, W/f, out_channels * (2 if double_z else 1))` in `dtype`,
    f = 2 ** (len(block_out_channels) - 1). Downsampling pads bottom/right only, as diffusers'
    VAE (`Downsample2D(padding=0)`). Matches diffusers `Encoder` with `DownEncoderBlock2D`s.
    Params: conv_in, down_blocks_{i}_resnets_{j}, down_blocks_{i}_downsamplers_0, mid_block,
    conv_norm_out, conv_out (diffusers' module paths with "." -> "_"). Raises UserError when a
    channel count is not divisible by `norm_num_groups`.
    """
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    double_z: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(self.block_out_channels[0], 3, padding=1, name="conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, num_groups=self.norm_num_groups, eps=EPS,
                                name=f"down_blocks_{i}_resnets_{j}", **kw)(h)
            if i < len(self.block_out_channels) - 1:
                h = Downsample(ch, padding=0, name=f"down_blocks_{i}_downsamplers_0", **kw)(h)
        h = MidBlock(self.norm_num_groups, self.mid_block_attention, name="mid_block", **kw)(h)
        h = nn.silu(group_norm(h, num_groups=self.norm_num_groups, eps=EPS, name="conv_norm_out", **kw))
        c = self.out_channels * (2 if self.double_z else 1)
        return conv2d(c, 3, padding=1, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """LDM decoder: conv_in -> mid block -> [resnets (+ upsample)] per level -> norm, SiLU, conv_out.

    `(B, h, w, c) -> (B, h*f, w*f, out_channels)` in `dtype`; each level has
    `layers_per_block + 1` resnets, levels run over reversed `block_out_channels`. Matches
    diffusers `Decoder` with `UpDecoderBlock2D`s (`norm_type="group"`). Params: conv_in,
    mid_block, up_blocks_{i}_resnets_{j}, up_blocks_{i}_upsamplers_0, conv_norm_out, conv_out.
    """
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(self.block_out_channels[-1], 3, padding=1, name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(self.norm_num_groups, self.mid_block_attention, name="mid_block", **kw)(h)
        for i, ch in enumerate(reversed(self.block_out_channels)):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, num_groups=self.norm_num_groups, eps=EPS,
                                name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
            if i < len(self.block_out_channels) - 1:
                h = Upsample(ch, name=f"up_blocks_{i}_upsamplers_0", **kw)(h)
        h = nn.silu(group_norm(h, num_groups=self.norm_num_groups, eps=EPS, name="conv_norm_out", **kw))
        return conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)


def check_image(x: jax.Array, channels: int, factor: int, field: str = "x") -> None:
    """Raise UserError unless `x` is `(B, H, W, channels)` with H and W divisible by `factor`."""
    check(x.ndim == 4, f"{field}.shape", tuple(x.shape), "must be (B, H, W, C)")
    check(x.shape[-1] == channels, f"{field}.shape[-1]", x.shape[-1],
          f"must equal the model's {channels} input channels")
    check(x.shape[1] % factor == 0 and x.shape[2] % factor == 0, f"{field}.shape[1:3]",
          tuple(x.shape[1:3]), f"H and W must be divisible by the downsampling factor {factor}")


# --------------------------------------------------------------------------- the autoencoder


def autoencode(self, x: jax.Array, rng: jax.Array | None = None,
               sample_posterior: bool = True) -> tuple[jax.Array, DiagonalGaussian]:
    """`(recon, posterior)`: encode, sample the posterior (its mode when `sample_posterior` is
    False or while initialising), decode. The `__call__` of the image and video autoencoders.

    Raises: UserError when sampling without `rng`."""
    posterior = self.encode(x)
    if sample_posterior and not self.is_initializing():
        check(rng is not None, "rng", rng, "a PRNG key is needed when sample_posterior=True")
        z = posterior.sample(rng)
    else:
        z = posterior.mode()
    return self.decode(z), posterior


def encode_latents(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Latents for diffusion: `(z - shift_factor) * scaling_factor`, z the posterior sample
    (its mode when `rng` is None)."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return (z - self.shift_factor) * self.scaling_factor


def decode_latents(self, z: jax.Array) -> jax.Array:
    """Inverse of `encode_latents`: decode `z / scaling_factor + shift_factor`."""
    return self.decode(z / self.scaling_factor + self.shift_factor)


class AutoencoderKL(nn.Module):
    """KL-regularised image autoencoder (LDM; diffusers `AutoencoderKL`).

    Methods (call with `module.apply(variables, ..., method=...)`):
      encode(x (B, H, W, in_channels) float in [-1, 1]) -> DiagonalGaussian with mean / logvar
        `(B, H/f, W/f, latent_channels)`, f = 2 ** (len(block_out_channels) - 1).
      decode(z (B, h, w, latent_channels)) -> (B, h*f, w*f, out_channels), about [-1, 1].
      __call__(x, rng=None, sample_posterior=True) -> (recon, posterior); `rng` is needed when
        sampling (except inside `init`, which uses the mode).
      encode_latents(x, rng=None) -> `(z - shift_factor) * scaling_factor`, z a posterior sample
        (the mode when rng is None): the latents a diffusion model is trained on (LDM Sec. 4.3.2,
        Appendix D.1 rescaling).
      decode_latents(z) -> decode(z / scaling_factor + shift_factor).

    Outputs are in `dtype`; the posterior's moments in float32.

    Raises:
      UserError (before compiling): x not 4-D, wrong channel count, H or W not divisible by f,
        latent channel count not `latent_channels`, channels not divisible by `norm_num_groups`,
        sampling without `rng`.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_attention=self.mid_block_attention, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.encoder = Encoder(self.latent_channels, double_z=True, **kw)
        self.decoder = Decoder(self.out_channels, **kw)
        ckw = dict(padding=0, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, 1, **ckw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, 1, **ckw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        check_image(x, self.in_channels, self.downsample_factor)
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        check(z.ndim == 4 and z.shape[-1] == self.latent_channels, "z.shape", tuple(z.shape),
              f"must be (B, h, w, {self.latent_channels}) (latent_channels)")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # Shared with `video_vae.VideoAutoencoderKL` (each Linen class wraps its own copy).
    __call__ = autoencode
    encode_latents = encode_latents
    decode_latents = decode_latents


# --------------------------------------------------------------------------- training losses


def vae_loss(recon: jax.Array, x: jax.Array, posterior: DiagonalGaussian, *,
             kl_weight: float = 1e-6, rec: str = "l1",
             perceptual_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
             perceptual_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction + KL loss of the LDM autoencoder (taming / LDM `LPIPSWithDiscriminator`
    without its discriminator term, with its learned log-variance fixed at 0).

        rec_px = |x - recon| (rec="l1") or (x - recon)^2 ("l2"), per pixel and channel
        rec_px += perceptual_weight * perceptual_fn(x, recon)   (per example, broadcast to pixels)
        nll = sum(rec_px) / B
        loss = nll + kl_weight * sum(KL(q(z|x) || N(0, I))) / B

    Args:
      recon, x: `(B, H, W, C)` float in [-1, 1].
      posterior: the encoder's `DiagonalGaussian`.
      kl_weight: 1e-6 in the SD / LDM f=8 KL configs.
      rec: "l1" (LDM) or "l2".
      perceptual_fn: optional `(x, recon) -> (B,)` distance, e.g. LPIPS.
      perceptual_weight: its weight (LDM: 1.0).

    Returns:
      (loss, metrics): float32 scalar and a dict of float32 scalars `loss`, `nll`, `rec_loss`
      (mean per-element reconstruction term), `kl` (mean per example), and `perceptual` when used.

    Raises:
      UserError: unknown `rec`, or `recon` and `x` shapes differ.
    """
    check(rec in ("l1", "l2"), "rec", rec, 'must be "l1" or "l2"')
    check(recon.shape == x.shape, "recon.shape", tuple(recon.shape), f"must equal x.shape {tuple(x.shape)}")
    diff = x.astype(jnp.float32) - recon.astype(jnp.float32)
    rec_px = jnp.abs(diff) if rec == "l1" else diff ** 2
    metrics = {"rec_loss": jnp.mean(rec_px)}
    if perceptual_fn is not None:
        p = jnp.asarray(perceptual_fn(x, recon), jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        rec_px = rec_px + perceptual_weight * p
        metrics["perceptual"] = jnp.mean(p)
    batch = x.shape[0]
    nll = jnp.sum(rec_px) / batch
    kl = jnp.sum(posterior.kl()) / batch
    loss = nll + kl_weight * kl
    return loss, {**metrics, "loss": loss, "nll": nll, "kl": kl}


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017; taming / LDM `NLayerDiscriminator`).

    conv4x4/2 (ndf) -> LeakyReLU(0.2) -> n_layers-1 x [conv4x4/2, BatchNorm, LeakyReLU] ->
    conv4x4/1, BatchNorm, LeakyReLU -> conv4x4/1 (1 channel); widths ndf * min(2**n, 8), all
    convs padded by 1, no conv bias before a BatchNorm; weights N(0, 0.02), BatchNorm scale
    N(1, 0.02) as taming's `weights_init`. With n_layers=3 each logit sees a 70x70 patch and a
    256x256 image gives 30x30 logits.

    Call: `(x (B, H, W, C) in [-1, 1], *, train: bool) -> logits (B, H', W', 1)` in `dtype`.
    BatchNorm keeps running statistics in the "batch_stats" collection: train with
    `apply(..., train=True, mutable=["batch_stats"])` (torch BatchNorm2d momentum 0.1 = Flax 0.9).
    """
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, CONV_IN, CONV_OUT))

        def conv(features, stride, bias, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=bias, kernel_init=init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)

        def norm(h, name):
            bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
                              scale_init=lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d))
            return bn(h.astype(jnp.float32)).astype(self.dtype)

        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = conv(self.ndf * min(2 ** n, 8), stride, False, f"conv_{n}")(h)
            h = nn.leaky_relu(norm(h, f"norm_{n}"), 0.2)
        return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)


def discriminator_hinge_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Hinge loss `0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))` (taming `hinge_d_loss`;
    Lim & Ye 2017). Float32 scalar; logits of any matching shapes."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator's adversarial loss `-mean(D(G(z)))` (taming `LPIPSWithDiscriminator`). Float32 scalar."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_disc_weight(nll_grads_norm: jax.Array, g_grads_norm: jax.Array, *,
                         disc_weight: float = 1.0) -> jax.Array:
    """Adaptive weight of the GAN term: `clip(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight`,
    without gradient (Esser et al. 2021, eq. 7; taming `calculate_adaptive_weight`).

    The norms are of the gradients of the nll (`vae_loss`) and of `generator_loss` with respect to
    the decoder's last layer (`params["decoder"]["conv_out"]["kernel"]`). A trainer gets both with
    one `jax.grad` each of a function of that kernel alone, e.g.
    `jax.grad(lambda k: nll_of(set_conv_out_kernel(params, k)))(kernel)`, then takes
    `jnp.linalg.norm` of each. Returns a float32 scalar.
    """
    w = jnp.asarray(nll_grads_norm, jnp.float32) / (jnp.asarray(g_grads_norm, jnp.float32) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


# --------------------------------------------------------------------------- variants, loading

VARIANTS: dict[str, dict[str, Any]] = {
    # stabilityai/sd-vae-ft-ema (and SD 1.x / 2.x `vae/`): f=8, 4 latent channels, 83,653,863 params.
    "sd": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215),
    # A small f=4 autoencoder for 28x28 / 32x32 MNIST-like data; set in/out_channels=3 for RGB.
    "mnist": dict(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                  layers_per_block=1, latent_channels=4, norm_num_groups=16, scaling_factor=1.0),
}


def Model(*, variant: str | None = None, **kw: Any) -> AutoencoderKL:
    """`AutoencoderKL` from a named variant (see `VARIANTS`), updated with `kw`.

    Raises UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant,
          f"must be one of {sorted(VARIANTS)}")
    return AutoencoderKL(**{**(VARIANTS[variant] if variant else {}), **kw})


_CONFIG_KEYS = {  # diffusers config.json -> AutoencoderKL attribute
    "in_channels": "in_channels", "out_channels": "out_channels",
    "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
    "latent_channels": "latent_channels", "norm_num_groups": "norm_num_groups",
    "mid_block_add_attention": "mid_block_attention", "use_quant_conv": "use_quant_conv",
    "use_post_quant_conv": "use_post_quant_conv", "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
}


def autoencoder_config(r: StateDictReader, config: dict, keys: dict[str, str]) -> dict[str, Any]:
    """Module kwargs of a diffusers `AutoencoderKL` / `VQModel` checkpoint.

    With a `config.json`: the entries named in `keys` (diffusers name -> our attribute), after
    checking that it uses SiLU and only `DownEncoderBlock2D` / `UpDecoderBlock2D`. Without one
    (a bare state dict): in/out/latent channels, block_out_channels, layers_per_block and
    mid_block_attention read from the shapes of the encoder / decoder keys; norm_num_groups and
    other constants keep the module defaults. Raises UserError naming a missing key.
    """
    if config:
        check(config.get("act_fn", "silu") == "silu", "config.act_fn", config.get("act_fn"), 'must be "silu"')
        for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            check(all(t == ok for t in config.get(key, [ok])), f"config.{key}", config.get(key),
                  f"every block must be {ok}")
        kw = {ours: config[theirs] for theirs, ours in keys.items() if config.get(theirs) is not None}
        kw["block_out_channels"] = tuple(kw.get("block_out_channels", (64,)))
        return kw

    def shape(key: str) -> tuple[int, ...]:
        return tuple(r.get(key).shape)

    in_channels = shape("encoder.conv_in.weight")[1]
    shape("encoder.down_blocks.0.resnets.0.conv2.weight")
    levels = layers = 0
    while r.has(f"encoder.down_blocks.{levels}.resnets.0.conv2.weight"):
        levels += 1
    while r.has(f"encoder.down_blocks.0.resnets.{layers}.conv1.weight"):
        layers += 1
    return dict(
        in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0]
                                 for i in range(levels)),
        layers_per_block=layers, latent_channels=shape("decoder.conv_in.weight")[1],
        mid_block_attention=any(k.startswith("encoder.mid_block.attentions.0.") for k in r.state))


def _load_mid(r: StateDictReader, prefix: str, attention: bool) -> dict[str, Any]:
    p = {"resnets_0": load_resnet(r, f"{prefix}.resnets.0"),
         "resnets_1": load_resnet(r, f"{prefix}.resnets.1")}
    if attention:
        p["attentions_0"] = load_attention(r, f"{prefix}.attentions.0")
    return p


def load_encoder(r: StateDictReader, prefix: str, module: nn.Module) -> dict[str, Any]:
    """`Encoder` params from diffusers `Encoder` keys under `prefix` ("encoder"), for the
    `block_out_channels`, `layers_per_block` and `mid_block_attention` of `module`."""
    levels, layers_per_block = len(module.block_out_channels), module.layers_per_block
    p = {"conv_in": r.conv(f"{prefix}.conv_in")}
    for i in range(levels):
        for j in range(layers_per_block):
            p[f"down_blocks_{i}_resnets_{j}"] = load_resnet(r, f"{prefix}.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            p[f"down_blocks_{i}_downsamplers_0"] = load_downsample(
                r, f"{prefix}.down_blocks.{i}.downsamplers.0")
    p["mid_block"] = _load_mid(r, f"{prefix}.mid_block", module.mid_block_attention)
    p["conv_norm_out"] = r.norm(f"{prefix}.conv_norm_out")
    p["conv_out"] = r.conv(f"{prefix}.conv_out")
    return p


def load_decoder(r: StateDictReader, prefix: str, module: nn.Module) -> dict[str, Any]:
    """`Decoder` params from diffusers `Decoder` keys under `prefix` ("decoder"), for the
    `block_out_channels`, `layers_per_block` and `mid_block_attention` of `module`."""
    levels, layers_per_block = len(module.block_out_channels), module.layers_per_block
    p = {"conv_in": r.conv(f"{prefix}.conv_in"),
         "mid_block": _load_mid(r, f"{prefix}.mid_block", module.mid_block_attention)}
    for i in range(levels):
        for j in range(layers_per_block + 1):
            p[f"up_blocks_{i}_resnets_{j}"] = load_resnet(r, f"{prefix}.up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            p[f"up_blocks_{i}_upsamplers_0"] = load_upsample(r, f"{prefix}.up_blocks.{i}.upsamplers.0")
    p["conv_norm_out"] = r.norm(f"{prefix}.conv_norm_out")
    p["conv_out"] = r.conv(f"{prefix}.conv_out")
    return p


def check_overrides(cls: type, overrides: dict[str, Any]) -> None:
    """Raise UserError for an override that is not an attribute of the module class `cls`."""
    fields = sorted(set(cls.__dataclass_fields__) - {"parent", "name"})
    for k in overrides:
        check(k in fields, "override", k, f"must be one of {fields}")


def check_params_match(module: nn.Module, params: dict, *args: Any, family: str) -> None:
    """Raise UserError unless `params` has exactly the paths and shapes of
    `nn.unbox(module.init(key, *args)["params"])` (checked with `jax.eval_shape`, no compute)."""
    expected = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), *args))["params"])
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key in sorted(set(want) | set(got)):
        check(want.get(key) == got.get(key), f"{family} param {key}", got.get(key),
              f"the state dict gives this shape but the model with this config needs {want.get(key)}")


def load_diffusers(src: Any, **overrides: Any) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Build an `AutoencoderKL` and its params from a diffusers `AutoencoderKL` checkpoint.

    Args:
      src: a diffusers model folder (`diffusion_pytorch_model.safetensors` + `config.json`, e.g.
        stabilityai/sd-vae-ft-ema), a `.safetensors` file, or a `{key: array}` dict. Without a
        config the hyper-parameters are read from the shapes; `norm_num_groups` (32) and
        `scaling_factor` (0.18215) then keep their defaults unless given in `overrides`.
      **overrides: `AutoencoderKL` attributes that replace the config's (e.g. dtype).

    Returns:
      (module, params): params are plain float32 jax arrays with the tree of
      `nn.unbox(module.init(...)["params"])`. Encoder mean and decoder output match diffusers to
      <= 1e-4 max abs in float32 (tests/models/test_vae.py).

    Raises:
      UserError: a missing key, a shape that does not fit the config, extra keys (a state dict of
        another model family), an unsupported config (act_fn / block types), unknown overrides.
    """
    state, config = load_state_dict(src)
    r = StateDictReader(state, "AutoencoderKL")
    check_overrides(AutoencoderKL, overrides)
    kw = autoencoder_config(r, config, _CONFIG_KEYS)
    if not config:
        kw.update(use_quant_conv=r.has("quant_conv.weight"), use_post_quant_conv=r.has("post_quant_conv.weight"))
    module = AutoencoderKL(**{**kw, **overrides})
    params: dict[str, Any] = {"encoder": load_encoder(r, "encoder", module),
                              "decoder": load_decoder(r, "decoder", module)}
    if module.use_quant_conv:
        params["quant_conv"] = r.conv("quant_conv")
    if module.use_post_quant_conv:
        params["post_quant_conv"] = r.conv("post_quant_conv")
    r.finish()
    f = module.downsample_factor
    check_params_match(module, params, jnp.zeros((1, f, f, module.in_channels)), family="AutoencoderKL")
    return module, jax.tree.map(jnp.asarray, params)
