"""Encoder and decoder of the LDM autoencoder, shared by the KL VAE (`vae.py`) and the VQ-VAE (`vqvae.py`).

Source: Rombach et al. 2022 (LDM), Appendix G; Esser et al. 2021 (VQGAN). Architecture, parameter
names and numbers match diffusers 0.42 `Encoder` / `Decoder` (`models/autoencoders/vae.py`, with
`DownEncoderBlock2D` / `UpDecoderBlock2D` and `UNetMidBlock2D`), built from the blocks of
`genjax.models.conv`. Images are `(B, H, W, C)`; a model with `len(block_out_channels)` levels
downsamples by f = 2 ** (levels - 1).

  MidBlock, Encoder, Decoder   the networks (every GroupNorm with eps `EPS`)
  check_image                  the input check of the image autoencoders
  autoencoder_config           module kwargs from a diffusers `AutoencoderKL` / `VQModel` config
                               or, without one, from the state dict's shapes
  load_encoder, load_decoder   diffusers state dict -> `Encoder` / `Decoder` params
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.io.weights import StateDictReader
from genjax.models.conv import (Downsample, ResnetBlock, SpatialAttention, Upsample, conv2d,
                                group_norm, load_attention, load_downsample, load_resnet,
                                load_upsample)

Dtype = Any
EPS = 1e-6  # every GroupNorm of the LDM autoencoder


# --------------------------------------------------------------------------- encoder / decoder


class MidBlock(nn.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution (diffusers `UNetMidBlock2D`
    with one layer, `temb_channels=None`, single-head attention). `(B, h, w, C) -> (B, h, w, C)`.
    `attention_impl`: the attention's `attention.dot_product_attention` implementation."""
    norm_num_groups: int = 32
    attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ResnetBlock(num_groups=self.norm_num_groups, eps=EPS, name="resnets_0", **kw)(h)
        if self.attention:
            h = SpatialAttention(num_groups=self.norm_num_groups, eps=EPS, attention_impl=self.attention_impl,
                                 name="attentions_0", **kw)(h)
        return ResnetBlock(num_groups=self.norm_num_groups, eps=EPS, name="resnets_1", **kw)(h)


class Encoder(nn.Module):
    """LDM encoder: conv_in -> [resnets (+ downsample)] per level -> mid block -> norm, SiLU, conv_out.

    `(B, H, W, C_in) -> (B, H/f, W/f, out_channels * (2 if double_z else 1))` in `dtype`,
    f = 2 ** (len(block_out_channels) - 1). Downsampling pads bottom/right only, as diffusers'
    VAE (`Downsample2D(padding=0)`). Matches diffusers `Encoder` with `DownEncoderBlock2D`s.
    Params: conv_in, down_blocks_{i}_resnets_{j}, down_blocks_{i}_downsamplers_0, mid_block,
    conv_norm_out, conv_out (diffusers' module paths with "." -> "_"). `attention_impl` goes to
    the mid block's attention. Raises UserError when a channel count is not divisible by
    `norm_num_groups`.
    """
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    double_z: bool = True
    attention_impl: str = "auto"
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
        h = MidBlock(self.norm_num_groups, self.mid_block_attention, attention_impl=self.attention_impl,
                     name="mid_block", **kw)(h)
        h = nn.silu(group_norm(h, num_groups=self.norm_num_groups, eps=EPS, name="conv_norm_out", **kw))
        c = self.out_channels * (2 if self.double_z else 1)
        return conv2d(c, 3, padding=1, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """LDM decoder: conv_in -> mid block -> [resnets (+ upsample)] per level -> norm, SiLU, conv_out.

    `(B, h, w, c) -> (B, h*f, w*f, out_channels)` in `dtype`; each level has
    `layers_per_block + 1` resnets, levels run over reversed `block_out_channels`. Matches
    diffusers `Decoder` with `UpDecoderBlock2D`s (`norm_type="group"`). Params: conv_in,
    mid_block, up_blocks_{i}_resnets_{j}, up_blocks_{i}_upsamplers_0, conv_norm_out, conv_out.
    `attention_impl` goes to the mid block's attention.
    """
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv2d(self.block_out_channels[-1], 3, padding=1, name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(self.norm_num_groups, self.mid_block_attention, attention_impl=self.attention_impl,
                     name="mid_block", **kw)(h)
        for i, ch in enumerate(reversed(self.block_out_channels)):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, num_groups=self.norm_num_groups, eps=EPS,
                                name=f"up_blocks_{i}_resnets_{j}", **kw)(h)
            if i < len(self.block_out_channels) - 1:
                h = Upsample(ch, name=f"up_blocks_{i}_upsamplers_0", **kw)(h)
        h = nn.silu(group_norm(h, num_groups=self.norm_num_groups, eps=EPS, name="conv_norm_out", **kw))
        return conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)


def coder_kwargs(m) -> dict[str, Any]:
    """The `Encoder` / `Decoder` keyword arguments of an LDM-style autoencoder module `m`
    (`vae.AutoencoderKL`, `vqvae.VQVAE`, `dvae.DiscreteVAE`), from its attributes of the same names."""
    return dict(block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                norm_num_groups=m.norm_num_groups, mid_block_attention=m.mid_block_attention,
                attention_impl=m.attention_impl, dtype=m.dtype, param_dtype=m.param_dtype)


def check_image(x: jax.Array, channels: int, factor: int, field: str = "x") -> None:
    """Raise UserError unless `x` is `(B, H, W, channels)` with H and W divisible by `factor`."""
    check(x.ndim == 4, f"{field}.shape", tuple(x.shape), "must be (B, H, W, C)")
    check(x.shape[-1] == channels, f"{field}.shape[-1]", x.shape[-1],
          f"must equal the model's {channels} input channels")
    check(x.shape[1] % factor == 0 and x.shape[2] % factor == 0, f"{field}.shape[1:3]",
          tuple(x.shape[1:3]), f"H and W must be divisible by the downsampling factor {factor}")


# --------------------------------------------------------------------------- diffusers weights


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
