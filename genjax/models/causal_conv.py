"""Causal 3D convolution blocks of the video autoencoder (`video_vae.py`): the 2D LDM blocks of
`genjax.models.conv` / `genjax.models.ldm_autoencoder` with a causal time axis.

Sources: Yu et al. 2024 (MAGVIT-v2, arXiv:2310.05737), Sec. 3.1: causal 3D CNN, first frame alone;
Yang et al. 2024 (CogVideoX, arXiv:2408.06072), Sec. 2.1. Videos are `(B, T, H, W, C)`
channels-last. Every conv pads only the past and GroupNorm / attention act per frame, so output
frame j never depends on input frames after the ones it covers.

  frame_group_norm      GroupNorm of each frame
  CausalConv3d          kt x kh x kw conv padded with kt - 1 past frames (`TEMPORAL_PADDINGS`)
  CausalResnetBlock     `conv.ResnetBlock` (no timestep) with causal convs
  SpaceTimeDownsample   halve H, W (and T: 1 + 2k -> 1 + k)
  SpaceTimeUpsample     double H, W (and T: 1 + k -> 1 + 2k)
  CausalMidBlock        resnet -> per-frame attention -> resnet
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models.conv import SpatialAttention, group_norm
from genjax.models.ldm_autoencoder import EPS
from genjax.parallel.axes import CONV_IN, CONV_OUT

Dtype = Any
TEMPORAL_PADDINGS = ("replicate", "zeros")


def _frames(fn, x: jax.Array) -> jax.Array:
    """Apply an image function `(N, H, W, C) -> (N, H, W, C')` to each frame of `x (B, T, H, W, C)`."""
    b, t = x.shape[:2]
    y = fn(x.reshape((b * t,) + x.shape[2:]))
    return y.reshape((b, t) + y.shape[1:])


def frame_group_norm(x: jax.Array, *, num_groups: int, dtype: Dtype, param_dtype: Dtype,
                     name: str) -> jax.Array:
    """GroupNorm of each frame of `x (B, T, H, W, C)` (statistics over H, W, C/groups, in float32).

    Per-frame statistics keep the network causal and make a 1-frame video match the 2D VAE.
    Call only inside an `@nn.compact` method (creates `nn.GroupNorm` `name`, params `(C,)`).
    """
    return _frames(lambda h: group_norm(h, num_groups=num_groups, eps=EPS, dtype=dtype,
                                        param_dtype=param_dtype, name=name), x)


class CausalConv3d(nn.Module):
    """3D convolution over `(B, T, H, W, C)` that is causal in time.

    The input is padded with `kt - 1` frames at the start (copies of the first frame for
    `temporal_padding="replicate"`, MAGVIT-v2 / CogVideoX; zeros for "zeros") and none at the end,
    then a VALID temporal conv is applied: output frame j (stride st) sees input frames
    st*j - kt + 1 .. st*j, so it never depends on later frames. "none" skips the padding: the
    caller prepends the kt - 1 past frames itself (a cache carried across chunks, `wan_vae.py`),
    and T_out = (T - kt) // st + 1. Spatial padding is symmetric
    (k // 2) by default, or explicit `((top, bottom), (left, right))`.

    Params: `kernel (kt, kh, kw, C_in, C_out)` with logical axes
    (None, None, None, conv_in, conv_out), `bias (C_out,)` (conv_out). The tap `kernel[-1]`
    acts on the current frame (the one `inflate_from_2d` fills).

    Call: `(x (B, T, H, W, C_in)) -> (B, (T - 1) // st + 1, H', W', features)` in `dtype`.

    Raises:
      UserError: x not 5-D, unknown `temporal_padding`.
    """
    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    strides: Sequence[int] = (1, 1, 1)
    spatial_padding: Any = None
    temporal_padding: str = "replicate"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check(x.ndim == 5, "x.shape", tuple(x.shape), "must be (B, T, H, W, C)")
        check(self.temporal_padding in TEMPORAL_PADDINGS + ("none",), "temporal_padding",
              self.temporal_padding, f"must be one of {TEMPORAL_PADDINGS + ('none',)}")
        kt, kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.linear.default_kernel_init, (None, None, None, CONV_IN, CONV_OUT)),
            (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
                          (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        if kt > 1 and self.temporal_padding != "none":
            first = x[:, :1] if self.temporal_padding == "replicate" else jnp.zeros_like(x[:, :1])
            x = jnp.concatenate([jnp.repeat(first, kt - 1, axis=1), x], axis=1)
        spatial = self.spatial_padding
        if spatial is None:
            spatial = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        # The kt taps as channels, then one 2D conv over (B * T_out) frames: the same sums as a
        # VALID conv3d, and ~5x faster than XLA:CPU's conv3d (forward + backward).
        st = self.strides[0]
        b, t_out = x.shape[0], (x.shape[1] - kt) // st + 1
        x = jnp.concatenate([x[:, k:k + st * (t_out - 1) + 1:st] for k in range(kt)], axis=-1)
        kernel = jnp.asarray(kernel, self.dtype).transpose(1, 2, 0, 3, 4).reshape(kh, kw, -1, self.features)
        y = jax.lax.conv_general_dilated(
            x.reshape((b * t_out,) + x.shape[2:]), kernel, window_strides=tuple(self.strides[1:]),
            padding=tuple(tuple(p) for p in spatial), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y + jnp.asarray(bias, self.dtype)).reshape((b, t_out) + y.shape[1:])


class CausalResnetBlock(nn.Module):
    """`conv.ResnetBlock` (no timestep) with causal kt x 3 x 3 convs and per-frame GroupNorm.

        h = conv2(silu(norm2(conv1(silu(norm1(x))))));  out = shortcut(x) + h

    shortcut = 1x1x1 conv when C_in != out_channels. Params as diffusers `ResnetBlock2D`:
    norm1, conv1, norm2, conv2, conv_shortcut. `(B, T, H, W, C_in) -> (B, T, H, W, C_out)`.
    """
    out_channels: int | None = None
    num_groups: int = 32
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(temporal_padding=self.temporal_padding, **kw)
        c_out = self.out_channels or x.shape[-1]
        k3 = (self.temporal_kernel_size, 3, 3)
        h = nn.silu(frame_group_norm(x, num_groups=self.num_groups, name="norm1", **kw))
        h = CausalConv3d(c_out, k3, name="conv1", **ckw)(h)
        h = nn.silu(frame_group_norm(h, num_groups=self.num_groups, name="norm2", **kw))
        h = CausalConv3d(c_out, k3, name="conv2", **ckw)(h)
        x = x.astype(self.dtype)
        if x.shape[-1] != c_out:
            x = CausalConv3d(c_out, (1, 1, 1), name="conv_shortcut", **ckw)(x)
        return x + h


class SpaceTimeDownsample(nn.Module):
    """Halve H and W, and T (1 + 2k -> 1 + k) when `temporal`: one causal kt x 3 x 3 conv with
    stride (2 or 1, 2, 2), padded at the bottom / right only (diffusers VAE `Downsample2D(padding=0)`).
    Param `conv` (a `CausalConv3d`)."""
    out_channels: int
    temporal: bool = False
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return CausalConv3d(self.out_channels, (self.temporal_kernel_size, 3, 3),
                            strides=(2 if self.temporal else 1, 2, 2),
                            spatial_padding=((0, 1), (0, 1)), temporal_padding=self.temporal_padding,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class SpaceTimeUpsample(nn.Module):
    """Nearest x2 in H and W and, when `temporal`, in T with the first copy dropped
    (1 + k -> 1 + 2k frames: [z0, z1, z1, z2, z2, ...]), then a causal kt x 3 x 3 conv
    (diffusers `Upsample2D` with a causal time axis). Param `conv`."""
    out_channels: int
    temporal: bool = False
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x.astype(self.dtype), 2, axis=2), 2, axis=3)
        if self.temporal:
            x = jnp.repeat(x, 2, axis=1)[:, 1:]
        return CausalConv3d(self.out_channels, (self.temporal_kernel_size, 3, 3),
                            temporal_padding=self.temporal_padding, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="conv")(x)


class CausalMidBlock(nn.Module):
    """resnet -> per-frame spatial attention (optional) -> resnet (`ldm_autoencoder.MidBlock` in 3D).
    `attention_impl`: the attention's `attention.dot_product_attention` implementation."""
    norm_num_groups: int = 32
    attention: bool = True
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rkw = dict(num_groups=self.norm_num_groups, temporal_kernel_size=self.temporal_kernel_size,
                   temporal_padding=self.temporal_padding, **kw)
        h = CausalResnetBlock(name="resnets_0", **rkw)(h)
        if self.attention:
            attn = SpatialAttention(num_groups=self.norm_num_groups, eps=EPS, attention_impl=self.attention_impl,
                                    name="attentions_0", **kw)
            h = _frames(attn, h)
        return CausalResnetBlock(name="resnets_1", **rkw)(h)
