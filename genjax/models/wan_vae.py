"""Wan 2.1 video VAE: causal 3D KL autoencoder with 4x temporal and 8x8 spatial compression.

Source: Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models"
(arXiv:2503.20314), Sec. 3.1 (Wan-VAE); the architecture, parameter names and numbers match
diffusers 0.42 `AutoencoderKLWan` (`models/autoencoders/autoencoder_kl_wan.py`, Wan 2.1 form:
`is_residual=False`, no `patch_size`), as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers `vae/`.

Layout (channels-last): videos `(B, T, H, W, C)` float in [-1, 1], T = 1 + k * ft; latents
`(B, 1 + k, H / fs, W / fs, z_dim)`, fs = 2 ** (len(dim_mult) - 1), ft = 2 ** sum(temporal_downsample)
(8 and 4 for Wan 2.1). Diffusion models see `(z - latents_mean) / latents_std` per channel.

The network: causal 3x3x3 convs (zero padded in time: `causal_conv.CausalConv3d` with the past
frames supplied here, so that a chunk can take them from the previous one), RMS norms and
attention per pixel / per frame (nothing else mixes frames), and `Resample` blocks whose
`time_conv` halves (encoder) or doubles (decoder) the frames after frame 0: 1 + 2k <-> 1 + k.

Chunked inference. diffusers encodes frame 0, then chunks of 4 frames, and decodes one latent
frame at a time, keeping each causal conv's last 2 input frames (`feat_cache`). Here the same
cache is the Flax collection "cache": `apply(..., mutable=["cache"])` makes every causal conv
read its past frames from it (zeros on the first chunk) and store its new ones, so
`encode_chunked` / `decode_chunked` run chunks in a `lax.scan` in bounded memory. The whole-video
`encode` / `decode` use zeros for the past and equal the chunked form (tests/models/test_wan_vae.py).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.io.weights import StateDictReader, check_overrides, check_params_match, load_state_dict
from genjax.models import vae
from genjax.models.attention import dot_product_attention
from genjax.models.causal_conv import CausalConv3d
from genjax.models.vae import DiagonalGaussian
from genjax.models.video_vae import check_video
from genjax.parallel.axes import NORM

Dtype = Any
CACHE = "cache"  # the Flax collection of the causal-conv caches
_K3 = (3, 3, 3)


# --------------------------------------------------------------------------- causal convs with a cache


def _caching(mod: nn.Module) -> bool:
    return mod.is_mutable_collection(CACHE) and not mod.is_initializing()


def _first_chunk(mod: nn.Module, name: str) -> bool:
    """True for a whole video, or the first chunk of a chunked one (no cache `name` yet)."""
    return not (_caching(mod) and mod.has_variable(CACHE, name))


def _past(mod: nn.Module, name: str, x: jax.Array, start: jax.Array) -> jax.Array:
    """The frames before `x (B, T, H, W, C)`: `start` at the start of a video, else those the
    previous chunk left in cache variable `name`, which becomes the last as many of concat(past, x)."""
    if not _caching(mod):
        return start
    var = mod.variable(CACHE, name, lambda: start)
    past = var.value
    var.value = jnp.concatenate([past, x], axis=1)[:, -past.shape[1]:]
    return past


def _conv(mod: nn.Module, x: jax.Array, features: int, name: str, kernel=_K3, strides=(1, 1, 1),
          spatial_padding=None, start: jax.Array | None = None) -> jax.Array:
    """diffusers `WanCausalConv3d` inside an `@nn.compact` method of `mod`: a VALID conv over
    concat(past, x), past = `start` (default kt - 1 zero frames) or the cached frames; no output
    frames when that is shorter than kt. Params `name/kernel (kt, kh, kw, C_in, features)`, `name/bias`."""
    x = x.astype(mod.dtype)
    if kernel[0] > 1:
        zeros = jnp.zeros((x.shape[0], kernel[0] - 1) + x.shape[2:], x.dtype)
        x = jnp.concatenate([_past(mod, name + "_past", x, zeros if start is None else start), x], axis=1)
    short = x.shape[1] < kernel[0]  # a time conv on a first chunk of one frame (or init with T = 1)
    if short:  # padded only so that the params exist; the output has 0 frames
        x = jnp.pad(x, ((0, 0), (0, kernel[0] - x.shape[1])) + ((0, 0),) * 3)
    y = CausalConv3d(features, kernel, strides, spatial_padding, temporal_padding="none",
                     dtype=mod.dtype, param_dtype=mod.param_dtype, name=name)(x)
    return y[:, :0] if short else y


# --------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """diffusers `WanRMS_norm` (bias=False): `x / max(||x||_2, 1e-12) * sqrt(C) * gamma` over the
    channels of each pixel, in float32, returned in `dtype`. Param `gamma (C,)`."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
                           (c,), self.param_dtype)
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        x = x / jnp.maximum(norm, 1e-12) * np.sqrt(c) * jnp.asarray(gamma, jnp.float32)
        return x.astype(self.dtype)


class ResidualBlock(nn.Module):
    """diffusers `WanResidualBlock` (dropout 0): `(B, T, H, W, C_in) -> (B, T, H, W, out_dim)`."""
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x.astype(self.dtype)
        if x.shape[-1] != self.out_dim:
            h = _conv(self, x, self.out_dim, "conv_shortcut", (1, 1, 1))
        x = _conv(self, nn.silu(RMSNorm(name="norm1", **kw)(x)), self.out_dim, "conv1")
        x = _conv(self, nn.silu(RMSNorm(name="norm2", **kw)(x)), self.out_dim, "conv2")
        return x + h


class AttentionBlock(nn.Module):
    """diffusers `WanAttentionBlock`: x + proj(attention(to_qkv(norm(x)))), one head over the
    H * W pixels of each frame (1x1 convs). `(B, T, H, W, C) -> same`."""
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, hh, ww, c = x.shape
        h = RMSNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        qkv = _conv(self, h, 3 * c, "to_qkv", (1, 1, 1)).reshape(b * t, hh * ww, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # (B*T, H*W, 1, C) each
        o = dot_product_attention(q, k, v, implementation=self.attention_impl).reshape(b, t, hh, ww, c)
        return x.astype(self.dtype) + _conv(self, o, c, "proj", (1, 1, 1))


class MidBlock(nn.Module):
    """diffusers `WanMidBlock` (num_layers=1): resnets_0 -> attentions_0 -> resnets_1."""
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResidualBlock(c, name="resnets_0", **kw)(x)
        x = AttentionBlock(self.attention_impl, name="attentions_0", **kw)(x)
        return ResidualBlock(c, name="resnets_1", **kw)(x)


class Resample(nn.Module):
    """diffusers `WanResample` (see the module docstring): mode "downsample2d" / "downsample3d"
    `(B, 1 + 2k or T, H, W, C) -> (B, 1 + k or T, H/2, W/2, C)`; "upsample2d" / "upsample3d"
    `(B, 1 + k or T, H, W, C) -> (B, 1 + 2k or T, 2H, 2W, out_dim)`. Params `resample_1`, `time_conv`."""
    mode: str
    out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, h, w, c = x.shape
        x = x.astype(self.dtype)
        first = _first_chunk(self, "time_conv_past")  # frame 0 skips time_conv (whole video / chunk 0)
        split = (lambda x: (x[:, :1], x[:, 1:])) if first else (lambda x: (x[:, :0], x))
        if self.mode == "upsample3d":  # each frame after frame 0 becomes two
            head, rest = split(x)
            y = _conv(self, rest, 2 * c, "time_conv", (3, 1, 1))  # (B, t, H, W, 2C)
            y = y.reshape(b, -1, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, -1, h, w, c)
            x = jnp.concatenate([head, y], axis=1)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return _conv(self, x, self.out_dim, "resample_1", (1, 3, 3))
        x = _conv(self, x, c, "resample_1", (1, 3, 3), (1, 2, 2), ((0, 1), (0, 1)))
        if self.mode == "downsample3d":  # frames (2j-2, 2j-1, 2j) -> frame j: past = frame 0
            head, rest = split(x)
            x = jnp.concatenate([head, _conv(self, rest, c, "time_conv", (3, 1, 1), (2, 1, 1), start=head)], axis=1)
        return x


class Encoder(nn.Module):
    """diffusers `WanEncoder3d` (attn_scales=[]): `(B, T, H, W, C_in) -> (B, 1 + (T-1)/ft, H/fs,
    W/fs, out_channels)`. Blocks are numbered `down_blocks_{n}` in one flat list, as diffusers."""
    out_channels: int
    base_dim: int = 96
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (False, True, True)
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        x = _conv(self, x, dims[0], "conv_in")
        n = 0
        for i in range(len(self.dim_mult)):
            for _ in range(self.num_res_blocks):
                x = ResidualBlock(dims[i + 1], name=f"down_blocks_{n}", **kw)(x)
                n += 1
            if i < len(self.dim_mult) - 1:
                mode = "downsample3d" if self.temporal_downsample[i] else "downsample2d"
                x = Resample(mode, name=f"down_blocks_{n}", **kw)(x)
                n += 1
        x = MidBlock(self.attention_impl, name="mid_block", **kw)(x)
        return _conv(self, nn.silu(RMSNorm(name="norm_out", **kw)(x)), self.out_channels, "conv_out")


class Decoder(Encoder):
    """diffusers `WanDecoder3d` (Wan 2.1: each up block after the first takes the halved
    channels of the previous upsampler): `(B, t, h, w, z_dim) -> (B, 1 + (t-1)*ft, h*fs, w*fs,
    out_channels)`; up block i upsamples in time when `temporal_downsample[::-1][i]`."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mult = tuple(self.dim_mult)
        dims = [self.base_dim * m for m in (mult[-1], *mult[::-1])]
        up_t = tuple(self.temporal_downsample)[::-1]
        x = _conv(self, z, dims[0], "conv_in")
        x = MidBlock(self.attention_impl, name="mid_block", **kw)(x)
        for i in range(len(mult)):
            for j in range(self.num_res_blocks + 1):
                x = ResidualBlock(dims[i + 1], name=f"up_blocks_{i}_resnets_{j}", **kw)(x)
            if i < len(mult) - 1:
                mode = "upsample3d" if up_t[i] else "upsample2d"
                x = Resample(mode, dims[i + 1] // 2, name=f"up_blocks_{i}_upsamplers_0", **kw)(x)
        return _conv(self, nn.silu(RMSNorm(name="norm_out", **kw)(x)), self.out_channels, "conv_out")


# --------------------------------------------------------------------------- the autoencoder

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class WanVAE(nn.Module):
    """The Wan 2.1 VAE (diffusers `AutoencoderKLWan`, Wan 2.1 form).

    Methods (call with `module.apply(variables, ..., method=...)`):
      encode(x (B, T, H, W, in_channels) float in [-1, 1], T = 1 + k*ft) -> DiagonalGaussian,
        mean / logvar float32 `(B, 1 + k, H/fs, W/fs, z_dim)` (logvar clamped to [-30, 20]).
      decode(z (B, t, h, w, z_dim)) -> (B, 1 + (t-1)*ft, h*fs, w*fs, out_channels) in `dtype`,
        clamped to [-1, 1] as diffusers.
      __call__(x, rng=None, sample_posterior=True) -> (recon, posterior), as `vae.AutoencoderKL`.
      encode_latents(x, rng=None) -> (z - latents_mean) / latents_std (z = mode if no rng);
      decode_latents(z) -> decode(z * latents_std + latents_mean).
    For long videos use `encode_chunked` / `decode_chunked` (same numbers, bounded memory).

    Attributes: diffusers' config names, except `temporal_downsample` (diffusers'
    `temperal_downsample`); `decoder_base_dim` None = base_dim; `attention_impl` of the mid-block
    attention (`attention.dot_product_attention`); dtype (compute), param_dtype.
    fs = 2 ** (len(dim_mult) - 1) (`downsample_factor`), ft = 2 ** sum(temporal_downsample)
    (`temporal_downsample_factor`).

    Raises:
      UserError (before compiling): x not `(B, 1 + k*ft, H, W, in_channels)` with H, W divisible
        by fs; z of the wrong rank / channels; len(temporal_downsample) != len(dim_mult) - 1;
        latents_mean / latents_std not of length z_dim.
    """
    in_channels: int = 3
    out_channels: int = 3
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (False, True, True)
    latents_mean: Sequence[float] = WAN21_LATENTS_MEAN
    latents_std: Sequence[float] = WAN21_LATENTS_STD
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_downsample_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def shift_factor(self) -> jax.Array:  # what vae.encode_latents / decode_latents subtract
        return jnp.asarray(self.latents_mean, jnp.float32)

    @property
    def scaling_factor(self) -> jax.Array:  # ... and multiply by, per channel
        return 1.0 / jnp.asarray(self.latents_std, jnp.float32)

    def setup(self):
        check(len(self.temporal_downsample) == len(self.dim_mult) - 1, "temporal_downsample",
              tuple(self.temporal_downsample), f"must have len(dim_mult) - 1 = {len(self.dim_mult) - 1} bools")
        for field in ("latents_mean", "latents_std"):
            check(len(getattr(self, field)) == self.z_dim, field, tuple(getattr(self, field)),
                  f"must have z_dim = {self.z_dim} values")
        kw = dict(dim_mult=tuple(self.dim_mult), num_res_blocks=self.num_res_blocks,
                  temporal_downsample=tuple(bool(t) for t in self.temporal_downsample),
                  attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(2 * self.z_dim, self.base_dim, **kw)
        self.decoder = Decoder(self.out_channels, self.decoder_base_dim or self.base_dim, **kw)
        ckw = dict(kernel_size=(1, 1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = CausalConv3d(2 * self.z_dim, **ckw)
        self.post_quant_conv = CausalConv3d(self.z_dim, **ckw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        check_video(x, self.in_channels, self.downsample_factor, self.temporal_downsample_factor)
        return DiagonalGaussian.from_moments(_moments(self, x))

    def decode(self, z: jax.Array) -> jax.Array:
        check(z.ndim == 5 and z.shape[-1] == self.z_dim, "z.shape", tuple(z.shape),
              f"must be (B, t, h, w, {self.z_dim}) (z_dim)")
        return jnp.clip(_frames(self, z), -1.0, 1.0)

    __call__ = vae.autoencode
    encode_latents = vae.encode_latents
    decode_latents = vae.decode_latents


def _moments(m: WanVAE, x: jax.Array) -> jax.Array:  # of a video or a chunk (any T)
    return m.quant_conv(m.encoder(x)).astype(jnp.float32)


def _frames(m: WanVAE, z: jax.Array) -> jax.Array:  # unclamped
    return m.decoder(m.post_quant_conv(z.astype(m.dtype)))


# --------------------------------------------------------------------------- chunked inference


def _chunked(module: WanVAE, params: Any, x: jax.Array, size: int, fn) -> jax.Array:
    """Run `fn(module, chunk)` on x[:, :1], then chunks of `size` frames (and a shorter last one),
    carrying the "cache" collection; the full-size chunks run in one `lax.scan`."""
    def step(cache, chunk):
        out, state = module.apply({"params": params, **cache}, chunk, method=fn, mutable=[CACHE])
        return state, out

    b, rest = x.shape[0], x[:, 1:]
    cache, head = step({}, x[:, :1])
    k = rest.shape[1] // size
    outs = [head]
    if k:
        chunks = rest[:, :k * size].reshape((b, k, size) + x.shape[2:]).swapaxes(0, 1)
        cache, ys = jax.lax.scan(step, cache, chunks)  # (k, B, t, ...)
        outs.append(ys.swapaxes(0, 1).reshape((b, -1) + ys.shape[3:]))
    if rest.shape[1] > k * size:
        outs.append(step(cache, rest[:, k * size:])[1])
    return jnp.concatenate(outs, axis=1)


def encode_chunked(module: WanVAE, params: Any, x: jax.Array, frames_per_chunk: int | None = None
                   ) -> DiagonalGaussian:
    """`module.encode(x)` as diffusers `AutoencoderKLWan._encode` computes it: frame 0, then chunks
    of `frames_per_chunk` frames (a multiple of ft, default ft = 4), each causal conv's past frames
    carried in the "cache" collection; activations of one chunk at a time. `params`: the unboxed
    "params"; x `(B, 1 + k*ft, H, W, in_channels)` in [-1, 1]. Jit-compatible (module and
    frames_per_chunk static). Returns `encode`'s posterior (equal to 1e-5, test_wan_vae.py).
    Raises UserError for a bad x (as `encode`) or frames_per_chunk."""
    ft = module.temporal_downsample_factor
    size = ft if frames_per_chunk is None else frames_per_chunk
    check(size > 0 and size % ft == 0, "frames_per_chunk", frames_per_chunk,
          f"must be a positive multiple of the temporal downsampling factor {ft}")
    check_video(x, module.in_channels, module.downsample_factor, ft)
    return DiagonalGaussian.from_moments(_chunked(module, params, x, size, _moments))


def decode_chunked(module: WanVAE, params: Any, z: jax.Array, latents_per_chunk: int = 1) -> jax.Array:
    """`module.decode(z (B, t, h, w, z_dim))` as diffusers `AutoencoderKLWan._decode` computes it:
    latent frame 0, then chunks of `latents_per_chunk` (default 1) latent frames, carrying the
    cache. Jit-compatible (module, latents_per_chunk static). Returns `(B, 1 + (t-1)*ft, h*fs,
    w*fs, out_channels)` in [-1, 1]. Raises UserError for a bad z or latents_per_chunk."""
    check(latents_per_chunk >= 1, "latents_per_chunk", latents_per_chunk, "must be >= 1")
    check(z.ndim == 5 and z.shape[-1] == module.z_dim, "z.shape", tuple(z.shape),
          f"must be (B, t, h, w, {module.z_dim}) (z_dim)")
    return jnp.clip(_chunked(module, params, z, latents_per_chunk, _frames), -1.0, 1.0)


# --------------------------------------------------------------------------- variants, loading

VARIANTS: dict[str, dict[str, Any]] = {
    # Wan 2.1 VAE (diffusers AutoencoderKLWan() defaults = Wan-AI/Wan2.1-*-Diffusers vae/):
    # 8x8 spatial, 4x temporal, 16 latent channels; 126,892,531 params.
    "wan2.1": dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                   temporal_downsample=(False, True, True), latents_mean=WAN21_LATENTS_MEAN,
                   latents_std=WAN21_LATENTS_STD),
}


def Model(*, variant: str | None = None, **kw: Any) -> WanVAE:
    """`WanVAE` from a named variant (see `VARIANTS`), updated with `kw`.

    Raises UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {sorted(VARIANTS)}")
    return WanVAE(**{**(VARIANTS[variant] if variant else {}), **kw})


_CONFIG_KEYS = ("in_channels", "out_channels", "base_dim", "decoder_base_dim", "z_dim", "dim_mult",
                "num_res_blocks", "latents_mean", "latents_std")
# Config values this port does not implement (Wan 2.2's residual blocks / patchify, dropout,
# encoder attention, which diffusers' encoder cannot run either) -> the only accepted value.
_UNSUPPORTED = {"is_residual": False, "patch_size": None, "dropout": 0.0, "attn_scales": []}


def _torch_key(path: tuple) -> str:
    """Flax param path -> diffusers key: `down_blocks_3` -> `down_blocks.3`, `kernel` -> `weight`."""
    names = [re.sub(r"_(\d+)(_|$)", lambda m: "." + m[1] + m[2].replace("_", "."), getattr(p, "key", p))
             for p in path]
    return ".".join(names[:-1] + ["weight" if names[-1] == "kernel" else names[-1]])


def load_diffusers(src: Any, **overrides: Any) -> tuple[WanVAE, dict[str, Any]]:
    """Build a `WanVAE` and its params from a diffusers `AutoencoderKLWan` checkpoint, torch-free.

    Args:
      src: a diffusers model folder (`diffusion_pytorch_model.safetensors` + `config.json`, e.g.
        the `vae/` of Wan-AI/Wan2.1-T2V-1.3B-Diffusers), a `.safetensors` file, or a
        `{key: array}` dict. Without a config, the Wan 2.1 defaults are used (give others in
        `overrides`).
      **overrides: `WanVAE` attributes that replace the config's (e.g. dtype).

    Returns:
      (module, params): plain float32 jax arrays in the tree of `nn.unbox(module.init(...)["params"])`.
      Encoder mean / std and decoder output match diffusers to <= 1e-4 in float32.

    Raises:
      UserError: a missing key, extra keys (another model family or config), a shape that does
        not fit the config, a config this port does not implement (Wan 2.2 `is_residual`,
        `patch_size`, dropout > 0, `attn_scales`), unknown overrides.
    """
    state, config = load_state_dict(src)
    check_overrides(WanVAE, overrides)
    for key, ok in _UNSUPPORTED.items():
        check(config.get(key, ok) == ok, f"config {key}", config.get(key), f"only {ok!r} is supported (Wan 2.1)")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _CONFIG_KEYS}
    if "temperal_downsample" in config:
        kw["temporal_downsample"] = tuple(bool(t) for t in config["temperal_downsample"])
    module = WanVAE(**{**kw, **overrides})
    fs, ft = module.downsample_factor, module.temporal_downsample_factor
    x = jnp.zeros((1, 1 + ft, fs, fs, module.in_channels))
    want = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), x))["params"])
    r = StateDictReader(state, "AutoencoderKLWan")

    def take(path, leaf):
        v = r.get(_torch_key(path))
        if getattr(path[-1], "key", None) == "gamma":
            return v.reshape(-1)
        if v.ndim in (4, 5) and len(leaf.shape) == 5:  # (O, I, [kt,] kh, kw) -> (kt, kh, kw, I, O)
            v = v[:, :, None] if v.ndim == 4 else v
            return np.transpose(v, (2, 3, 4, 1, 0))
        return v

    params = jax.tree_util.tree_map_with_path(take, want)
    r.finish()
    check_params_match(module, params, x, family="AutoencoderKLWan")
    return module, jax.tree.map(jnp.asarray, params)
