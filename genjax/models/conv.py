"""Convolutional building blocks shared by the U-Net and the (VQ-)VAEs.

All blocks are channels-last: images `(B, H, W, C)`. They follow diffusers' layer semantics so
that diffusers checkpoints load and give the same numbers (<= 1e-4 max abs in float32, checked in
tests/models/test_conv.py and test_unet.py):

  ResnetBlock       diffusers `ResnetBlock2D` (Ho et al. 2020 DDPM residual block; ADM scale-shift
                    norm from Dhariwal & Nichol 2021, Sec. 3 "AdaGN")
  Downsample        diffusers `Downsample2D(use_conv=True)`: stride-2 conv3x3
  Upsample          diffusers `Upsample2D(use_conv=True)`: nearest x2 + conv3x3
  SpatialAttention  diffusers `Attention` over H*W tokens, `residual_connection=True`
                    (the DDPM / LDM "AttnBlock")
  SpatialCrossAttention  H*W tokens attend to text tokens (LDM SpatialTransformer's cross-attention
                    sub-layer), zero-initialised output projection

GroupNorm and softmax compute in float32 whatever the compute `dtype`. Each block has a matching
`load_*` function that converts the block's diffusers state-dict entries (via
`genjax.io.weights.StateDictReader`) into the Flax param tree `nn.unbox(block.init(...))` has.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from genjax.errors import check
from genjax.io.weights import StateDictReader
from genjax.models.attention import Attention
from genjax.models.layers import LayerNorm, zeros
from genjax.parallel.axes import CONV_IN, CONV_OUT, EMBED, MLP, NORM

Dtype = Any


def conv2d(features: int, kernel_size: int, *, strides: int = 1, padding: Any = "SAME",
           dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
           name: str | None = None) -> nn.Conv:
    """A 2D `nn.Conv` whose kernel `(k, k, C_in, C_out)` and bias `(C_out,)` carry logical axes.

    `padding` is Flax's: "SAME", "VALID", an int, or ((top, bottom), (left, right)).
    """
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
        dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init,
                                                 (None, None, CONV_IN, CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)))


def dense(features: int, axes: tuple[str, str], *, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """An `nn.Dense` whose kernel `(D_in, D_out)` carries logical `axes` and bias `(axes[1],)`."""
    return nn.Dense(
        features, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def group_norm(x: jnp.ndarray, *, num_groups: int, eps: float, dtype: Dtype,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> jnp.ndarray:
    """GroupNorm over (H, W, C/groups) of `x (B, ..., C)`, computed in float32, returned in `dtype`.

    Matches `torch.nn.GroupNorm(num_groups, C, eps, affine=True)` (Wu & He 2018). Call only from
    inside an `@nn.compact` method: it creates an `nn.GroupNorm` submodule named `name`
    (params `scale`, `bias`, shape `(C,)`).

    Raises:
      UserError: C is not divisible by `num_groups`.
    """
    check(x.shape[-1] % num_groups == 0, "channels", x.shape[-1],
          f"must be divisible by norm_num_groups={num_groups}")
    norm = nn.GroupNorm(
        num_groups=num_groups, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
        use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))
    return norm(x.astype(jnp.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    """Pre-norm residual block with optional timestep conditioning (diffusers `ResnetBlock2D`).

        h = conv1(silu(norm1(x)))
        "default":     h = silu(norm2(h + time_emb_proj(silu(temb))))
        "scale_shift": h = silu(norm2(h) * (1 + scale) + shift),  (scale, shift) = time_emb_proj(silu(temb))
        h = conv2(dropout(h))
        out = (shortcut(x) + h) / output_scale_factor

    `shortcut` is a 1x1 conv when C_in != out_channels, else identity. Source: Ho et al. 2020
    (DDPM) Appendix B; scale-shift ("AdaGN") from Dhariwal & Nichol 2021 Sec. 3; numbers match
    diffusers 0.42 `ResnetBlock2D` (`pre_norm=True`, `non_linearity="silu"`).

    Attributes:
      out_channels: C_out; None keeps C_in.
      temb_channels: width of `temb`; None builds no `time_emb_proj` (the VAE's blocks).
      num_groups / num_groups_out: GroupNorm groups of norm1 / norm2 (None: same as num_groups).
      eps: GroupNorm epsilon.
      time_embedding_norm: "default" (add) or "scale_shift" (ADM).
      dropout: dropout rate before conv2 (active only with `train=True`, rng "dropout").
      output_scale_factor: divides the output.

    Call: `(x (B, H, W, C_in), temb (B, temb_channels) or None, *, train=False) -> (B, H, W, C_out)`
    in `dtype`.

    Raises:
      UserError: bad `time_embedding_norm`; C_in or C_out not divisible by the group counts;
        `temb` missing or of the wrong width when `temb_channels` is set.
    """
    out_channels: int | None = None
    temb_channels: int | None = None
    num_groups: int = 32
    num_groups_out: int | None = None
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None, *,
                 train: bool = False) -> jnp.ndarray:
        check(self.time_embedding_norm in ("default", "scale_shift"), "time_embedding_norm",
              self.time_embedding_norm, 'must be "default" or "scale_shift"')
        if self.temb_channels is not None:
            check(temb is not None and temb.shape[-1] == self.temb_channels, "temb",
                  None if temb is None else temb.shape,
                  f"must be (B, {self.temb_channels}) since temb_channels={self.temb_channels}")
        c_in = x.shape[-1]
        c_out = self.out_channels or c_in
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups_out = self.num_groups_out or self.num_groups

        h = nn.silu(group_norm(x, num_groups=self.num_groups, eps=self.eps, name="norm1", **kw))
        h = conv2d(c_out, 3, padding=1, name="conv1", **kw)(h)

        scale = shift = None
        if self.temb_channels is not None:
            width = c_out * (2 if self.time_embedding_norm == "scale_shift" else 1)
            emb = dense(width, (EMBED, CONV_OUT), name="time_emb_proj", **kw)(
                nn.silu(temb.astype(self.dtype)))[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = h + emb
            else:
                scale, shift = jnp.split(emb, 2, axis=-1)
        h = group_norm(h, num_groups=groups_out, eps=self.eps, name="norm2", **kw)
        if scale is not None:
            h = h * (1 + scale) + shift
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv2d(c_out, 3, padding=1, name="conv2", **kw)(h)

        if c_in != c_out:
            x = conv2d(c_out, 1, padding=0, name="conv_shortcut", **kw)(x)
        return ((x.astype(self.dtype) + h) / self.output_scale_factor).astype(self.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv halving H and W (diffusers `Downsample2D(use_conv=True)`).

    Attributes:
      out_channels: C_out; None keeps C_in.
      padding: 1 pads one pixel on every side (the U-Net: `downsample_padding=1`); 0 pads one
        pixel at the bottom and right only (diffusers' VAE encoder: `padding=0` + F.pad(0,1,0,1)).

    Call: `(x (B, H, W, C_in)) -> (B, ceil(H/2), ceil(W/2), C_out)` (H/2 for even H) in `dtype`.

    Raises:
      UserError: `padding` not 0 or 1.
    """
    out_channels: int | None = None
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        check(self.padding in (0, 1), "padding", self.padding,
              "must be 1 (symmetric, U-Net) or 0 (bottom/right only, VAE encoder)")
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv2d(self.out_channels or x.shape[-1], 3, strides=2, padding=pad, name="conv",
                      dtype=self.dtype, param_dtype=self.param_dtype)(x.astype(self.dtype))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 conv (diffusers `Upsample2D(use_conv=True)`).

    Call: `(x (B, H, W, C_in)) -> (B, 2H, 2W, C_out)` in `dtype`; `out_channels=None` keeps C_in.
    """
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=1), 2, axis=2)
        return conv2d(self.out_channels or x.shape[-1], 3, padding=1, name="conv",
                      dtype=self.dtype, param_dtype=self.param_dtype)(x)


class SpatialAttention(nn.Module):
    """Self-attention over the H*W positions of an image, with a residual connection.

        h = group_norm(x)                                  (skipped when num_groups is None)
        o = Attention(h as (B, H*W, C))                    `attention.Attention` "attn": to_q / to_k /
                                                           to_v C -> (N, K), N*K = C, to_out -> C
        out = (o + x) / rescale_output_factor              softmax(q k^T / sqrt(K)) in float32

    The DDPM / LDM "AttnBlock" (Ho et al. 2020 Appendix B; Wang et al. 2018 non-local block);
    numbers match diffusers 0.42 `Attention(residual_connection=True, upcast_softmax=True,
    _from_deprecated_attn_block=True)` as used in UNet2DModel and AutoencoderKL.

    Attributes:
      head_dim: K; None means one head of width C.
      num_groups: GroupNorm groups, or None for no norm (diffusers' mid block with
        `resnet_time_scale_shift="scale_shift"` and no `attn_norm_num_groups`).
      eps: GroupNorm epsilon.
      rescale_output_factor: divides the output.
      attention_impl: `attention.dot_product_attention`'s implementation.

    Call: `(x (B, H, W, C)) -> (B, H, W, C)` in `dtype`.

    Raises:
      UserError: C not divisible by `head_dim` or by `num_groups`.
    """
    head_dim: int | None = None
    num_groups: int | None = 32
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, height, width, c = x.shape
        head_dim = self.head_dim or c
        check(c % head_dim == 0, "attention_head_dim", head_dim,
              f"must divide the attention block's channel count {c}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        h = x
        if self.num_groups is not None:
            h = group_norm(h, num_groups=self.num_groups, eps=self.eps, name="group_norm", **kw)
        o = Attention(c // head_dim, head_dim=head_dim, attention_impl=self.attention_impl, name="attn",
                      **kw)(h.reshape(b, height * width, c))
        return ((o.reshape(b, height, width, c) + x) / self.rescale_output_factor).astype(self.dtype)


class SpatialCrossAttention(nn.Module):
    """Cross-attention from an image's H*W positions to context (text) tokens, with a residual.

        h = layer_norm(x)                                  per position over C, float32
        o = Attention(h, context, context_mask)            `attention.Attention`: to_q C -> (N, K),
                                                           to_k / to_v Dc -> (N, K), to_out -> C
        out = x + proj_out(o)                              proj_out (C -> C) zero-initialised

    The cross-attention sub-layer of LDM's SpatialTransformer (Rombach et al. 2022, Sec. 3.3,
    eq. 3: Q from the image features, K and V from the conditioning tokens tau(y)) as in diffusers
    `BasicTransformerBlock` (`norm2` LayerNorm eps 1e-5 -> `attn2` with bias-free q/k/v and a
    biased `to_out`), followed by a zero-initialised projection as LDM's `proj_out`
    (`zero_module`), so a freshly initialised block is the identity and adding it to a trained
    U-Net changes nothing until it learns. Numbers checked against torch `LayerNorm` + diffusers
    `Attention(cross_attention_dim=Dc, bias=False)` + `Linear` in tests/models/test_conv.py.

    Attributes:
      head_dim: K; None means one head of width C.
      eps: LayerNorm epsilon.
      attention_impl: `attention.dot_product_attention`'s implementation.

    Call: `(x (B, H, W, C), context (B, S, Dc) float, context_mask (B, S) bool, True = attend)
    -> (B, H, W, C)` in `dtype`. Masked context tokens get weight exactly 0, so their values never
    reach the output; a row whose mask is all False gets 0 before `to_out` (output x +
    proj_out(to_out.bias)).

    Raises:
      UserError: C not divisible by `head_dim`; context not 3-D or not of batch B; context_mask
        not (B, S).
    """
    head_dim: int | None = None
    eps: float = 1e-5
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, context_mask: jnp.ndarray) -> jnp.ndarray:
        b, height, width, c = x.shape
        head_dim = self.head_dim or c
        check(c % head_dim == 0, "attention_head_dim", head_dim,
              f"must divide the attention block's channel count {c}")
        check(context.ndim == 3 and context.shape[0] == b, "context.shape", context.shape,
              f"must be (B, S, Dc) with B={b}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        h = LayerNorm(epsilon=self.eps, name="norm", **kw)(x.reshape(b, height * width, c))
        o = Attention(c // head_dim, head_dim=head_dim, qkv_bias=False, attention_impl=self.attention_impl,
                      name="attn", **kw)(
            h, context.astype(self.dtype), context_mask=jnp.asarray(context_mask).astype(bool))
        o = nn.Dense(c, name="proj_out", **kw, kernel_init=zeros((MLP, EMBED)), bias_init=zeros((EMBED,)))(o)
        return (x + o.reshape(b, height, width, c)).astype(self.dtype)


# --- diffusers state dict -> Flax params (numpy), one function per block ----------------------
# `prefix` is the block's module path in the state dict ("down_blocks.0.resnets.1"; "" for a
# bare block).

def _dot(prefix: str) -> str:
    return f"{prefix}." if prefix else ""


def load_resnet(r: StateDictReader, prefix: str) -> dict[str, Any]:
    """Params of a `ResnetBlock` from diffusers `ResnetBlock2D` keys under `prefix`.

    `time_emb_proj` and `conv_shortcut` are read when present in the state dict; the caller's
    final shape check against `init` (or `StateDictReader.finish`) catches a mismatch.
    """
    prefix = _dot(prefix)
    p = {"norm1": r.norm(f"{prefix}norm1"), "conv1": r.conv(f"{prefix}conv1"),
         "norm2": r.norm(f"{prefix}norm2"), "conv2": r.conv(f"{prefix}conv2")}
    if r.has(f"{prefix}time_emb_proj.weight"):
        p["time_emb_proj"] = r.linear(f"{prefix}time_emb_proj")
    if r.has(f"{prefix}conv_shortcut.weight"):
        p["conv_shortcut"] = r.conv(f"{prefix}conv_shortcut")
    return p


def load_downsample(r: StateDictReader, prefix: str) -> dict[str, Any]:
    """Params of a `Downsample` from diffusers `Downsample2D(name="op")` key `<prefix>.conv.*`."""
    return {"conv": r.conv(f"{_dot(prefix)}conv")}


def load_upsample(r: StateDictReader, prefix: str) -> dict[str, Any]:
    """Params of an `Upsample` from diffusers `Upsample2D` key `<prefix>.conv.*`."""
    return {"conv": r.conv(f"{_dot(prefix)}conv")}


# Pre-0.14 diffusers "AttentionBlock" names, which checkpoints such as google/ddpm-cifar10-32
# still use; diffusers renames them on load (ModelMixin._convert_deprecated_attention_blocks).
_DEPRECATED_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value",
                               "to_out.0": "proj_attn"}


def load_attention(r: StateDictReader, prefix: str, head_dim: int | None = None) -> dict[str, Any]:
    """Params of a `SpatialAttention(head_dim=head_dim)` from diffusers `Attention` keys under `prefix`.

    Accepts both current names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the deprecated
    `query`, `key`, `value`, `proj_attn`. `group_norm` is read when present. The torch Linear
    weights `(C, C)` become `attn`'s DenseGeneral params: to_q / to_k / to_v kernel `(C, N, K)`,
    bias `(N, K)`; to_out kernel `(N, K, C)`, bias `(C,)`, with K = head_dim (None: one head,
    K = C) and N = C / K (the state dict does not record the head count).
    """
    prefix, p = _dot(prefix), {}
    if r.has(f"{prefix}group_norm.weight"):
        p["group_norm"] = r.norm(f"{prefix}group_norm")
    attn = {}
    for ours, theirs in _DEPRECATED_ATTENTION_NAMES.items():
        name = theirs if r.has(f"{prefix}{theirs}.weight") else ours
        lin = r.linear(f"{prefix}{name}")  # kernel (C_in, C_out), bias (C_out,)
        c = lin["kernel"].shape[0]
        k = head_dim or c
        check(c % k == 0, "attention_head_dim", head_dim, f"must divide the attention block's channel count {c}")
        if ours == "to_out.0":
            attn["to_out"] = {"kernel": lin["kernel"].reshape(c // k, k, -1), "bias": lin["bias"]}
        else:
            attn[ours] = {"kernel": lin["kernel"].reshape(c, c // k, k), "bias": lin["bias"].reshape(c // k, k)}
    p["attn"] = attn
    return p
