"""2D KL autoencoder of latent diffusion (LDM / Stable Diffusion `AutoencoderKL`).

Source: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), Sec. 3.1 and Appendix G; the architecture, parameter names and numbers
match diffusers 0.42 `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`
Encoder / Decoder / DiagonalGaussianDistribution), as in stabilityai/sd-vae-ft-ema. The encoder and
decoder (shared with the VQ-VAE) are in `genjax.models.ldm_autoencoder`. The training loss
`vae_loss` follows taming-transformers / LDM `LPIPSWithDiscriminator` without its GAN term
(Esser et al. 2021, "Taming Transformers"); the discriminator and adversarial losses are in
`genjax.models.discriminator`.

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
from genjax.io.weights import StateDictReader, check_overrides, check_params_match, load_state_dict
from genjax.models.conv import conv2d
from genjax.models.ldm_autoencoder import (Decoder, Encoder, autoencoder_config, check_image, coder_kwargs,
                                           load_decoder, load_encoder)

Dtype = Any


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

    Outputs are in `dtype`; the posterior's moments in float32. `attention_impl`: the attention
    implementation of the encoder's and decoder's mid-block attention, see
    `attention.dot_product_attention`.

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
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = coder_kwargs(self)
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
