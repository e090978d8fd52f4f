"""The U-Net's blocks: encoder, middle and decoder levels, and the text-conditioning embedding.

Built from `genjax.models.conv` (ResnetBlock, SpatialAttention, SpatialCrossAttention,
Downsample, Upsample); structure and parameter names match diffusers 0.42 `DownBlock2D` /
`AttnDownBlock2D`, `UNetMidBlock2D`, `UpBlock2D` / `AttnUpBlock2D` (Ho et al. 2020 Appendix B;
Dhariwal & Nichol 2021 Sec. 3). `genjax.models.unet.UNet` stacks them:

  DownBlock       num_layers x (ResnetBlock [+ SpatialAttention [+ cross-attention]]) [+ Downsample]
  MidBlock        ResnetBlock -> [SpatialAttention [+ cross-attention]] -> ResnetBlock
  UpBlock         num_layers x (concat skip -> ResnetBlock [+ attention]) [+ Upsample]
  TextEmbedding   text tokens -> cross-attention context, mask and a pooled time-embedding term,
                  with the learned null text of classifier-free guidance (Ho & Salimans 2022)

Images are `(B, H, W, C)` channels-last; `temb (B, E)` is the U-Net's time embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from genjax.models import conv
from genjax.parallel.axes import EMBED, MLP

Dtype = Any


class DownBlock(nn.Module):
    """One encoder level: `num_layers` x (ResnetBlock [+ SpatialAttention]) [+ Downsample].

    diffusers `DownBlock2D` (`attention=False`) / `AttnDownBlock2D` (`attention=True`); with
    `cross_attention` each SpatialAttention is followed by a `conv.SpatialCrossAttention` to the
    text tokens (`cross_attentions_{j}`).
    Call: `(x (B, H, W, C_in), temb (B, E), train, text (B, S, Dc) | None, text_mask (B, S) | None)
    -> (h, skips)`, `h (B, H', W', C_out)` with H' = H/2 when `add_downsample`, and `skips` the
    tuple of every layer's output (the downsampled one last).
    """
    out_channels: int
    num_layers: int
    attention: bool
    add_downsample: bool
    attention_head_dim: int | None
    num_groups: int
    eps: float
    time_embedding_norm: str
    dropout: float
    downsample_padding: int
    temb_channels: int
    cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False, text=None, text_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(attention_impl=self.attention_impl, **kw)  # the attention layers' kwargs
        skips = []
        for j in range(self.num_layers):
            x = conv.ResnetBlock(out_channels=self.out_channels, temb_channels=self.temb_channels,
                                 num_groups=self.num_groups, eps=self.eps,
                                 time_embedding_norm=self.time_embedding_norm,
                                 dropout=self.dropout, name=f"resnets_{j}", **kw)(x, temb, train=train)
            if self.attention:
                x = conv.SpatialAttention(head_dim=self.attention_head_dim, num_groups=self.num_groups,
                                          eps=self.eps, name=f"attentions_{j}", **akw)(x)
                if self.cross_attention:
                    x = conv.SpatialCrossAttention(head_dim=self.attention_head_dim,
                                                   name=f"cross_attentions_{j}", **akw)(x, text, text_mask)
            skips.append(x)
        if self.add_downsample:
            x = conv.Downsample(out_channels=self.out_channels, padding=self.downsample_padding,
                                name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """ResnetBlock -> [SpatialAttention] -> ResnetBlock at the lowest resolution.

    diffusers `UNetMidBlock2D`. `attn_num_groups=None` drops the attention's GroupNorm (diffusers
    does this with `resnet_time_scale_shift="scale_shift"` unless `attn_norm_num_groups` is set).
    With `cross_attention` (and `attention`) a `conv.SpatialCrossAttention` follows the attention.
    Call: `(x (B, H, W, C), temb (B, E), train, text, text_mask) -> (B, H, W, C)`.
    """
    attention: bool
    attention_head_dim: int | None
    num_groups: int
    attn_num_groups: int | None
    eps: float
    time_embedding_norm: str
    dropout: float
    output_scale_factor: float
    temb_channels: int
    cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False, text=None, text_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(attention_impl=self.attention_impl, **kw)
        resnet = dict(temb_channels=self.temb_channels, num_groups=self.num_groups, eps=self.eps,
                      time_embedding_norm=self.time_embedding_norm, dropout=self.dropout,
                      output_scale_factor=self.output_scale_factor, **kw)
        x = conv.ResnetBlock(name="resnets_0", **resnet)(x, temb, train=train)
        if self.attention:
            x = conv.SpatialAttention(head_dim=self.attention_head_dim, num_groups=self.attn_num_groups,
                                      eps=self.eps, rescale_output_factor=self.output_scale_factor,
                                      name="attentions_0", **akw)(x)
            if self.cross_attention:
                x = conv.SpatialCrossAttention(head_dim=self.attention_head_dim,
                                               name="cross_attentions_0", **akw)(x, text, text_mask)
        return conv.ResnetBlock(name="resnets_1", **resnet)(x, temb, train=train)


class UpBlock(nn.Module):
    """One decoder level: `num_layers` x (concat skip -> ResnetBlock [+ SpatialAttention]) [+ Upsample].

    diffusers `UpBlock2D` / `AttnUpBlock2D`; `cross_attention` as in `DownBlock`. Call: `(x (B, H,
    W, C), skips, temb (B, E), train, text, text_mask) -> (B, H', W', out_channels)`, H' = 2H when
    `add_upsample`; `skips` holds `num_layers` tensors, consumed last-first and concatenated on
    channels.
    """
    out_channels: int
    num_layers: int
    attention: bool
    add_upsample: bool
    attention_head_dim: int | None
    num_groups: int
    eps: float
    time_embedding_norm: str
    dropout: float
    temb_channels: int
    cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, train: bool = False, text=None, text_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(attention_impl=self.attention_impl, **kw)
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = conv.ResnetBlock(out_channels=self.out_channels, temb_channels=self.temb_channels,
                                 num_groups=self.num_groups, eps=self.eps,
                                 time_embedding_norm=self.time_embedding_norm,
                                 dropout=self.dropout, name=f"resnets_{j}", **kw)(x, temb, train=train)
            if self.attention:
                x = conv.SpatialAttention(head_dim=self.attention_head_dim, num_groups=self.num_groups,
                                          eps=self.eps, name=f"attentions_{j}", **akw)(x)
                if self.cross_attention:
                    x = conv.SpatialCrossAttention(head_dim=self.attention_head_dim,
                                                   name=f"cross_attentions_{j}", **akw)(x, text, text_mask)
        if self.add_upsample:
            x = conv.Upsample(out_channels=self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class TextEmbedding(nn.Module):
    """Text tokens -> cross-attention context, its mask and a pooled time-embedding term.

    Params: `null_text (Dc,)` normal(0.02), the learned unconditional prompt; `pooled_proj`
    Dense(Dc -> features), zero-initialised (a fresh text U-Net has the time embedding of the
    U-Net without text).

    Call: `(text (B, S, Dc) float, text_mask (B, S) bool, True = real token, drop (B,) bool or
    None) -> (context (B, S, Dc) in dtype, context_mask (B, S) bool, pooled (B, features) in dtype)`:
      - where `drop`: every token becomes `null_text` and the mask keeps only the first, i.e. the
        null prompt is one valid token (classifier-free guidance dropout, Ho & Salimans 2022);
      - pooled = pooled_proj(masked mean of the tokens over valid positions), computed in float32
        with `jnp.where`, so padding values never reach it (an all-padding row pools to 0).
    """
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text, text_mask, drop=None):
        null_text = self.param("null_text", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (EMBED,)), (text.shape[-1],), self.param_dtype)
        text = text.astype(jnp.float32)
        mask = jnp.asarray(text_mask).astype(bool)
        if drop is not None:
            drop = jnp.asarray(drop, bool)[:, None]
            text = jnp.where(drop[..., None], jnp.asarray(null_text, jnp.float32), text)
            mask = jnp.where(drop, jnp.arange(mask.shape[1]) == 0, mask)
        total = jnp.where(mask[..., None], text, 0.0).sum(axis=1)
        pooled = total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
        zeros = nn.initializers.zeros_init()
        pooled = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="pooled_proj",
                          kernel_init=nn.with_logical_partitioning(zeros, (EMBED, MLP)),
                          bias_init=nn.with_logical_partitioning(zeros, (MLP,)))(pooled.astype(self.dtype))
        return text.astype(self.dtype), mask, pooled
