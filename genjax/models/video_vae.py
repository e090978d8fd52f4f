"""Causal spatio-temporal KL video autoencoder, inflated from the 2D LDM `AutoencoderKL`.

Sources: Brooks et al. 2024, "Video generation models as world simulators" (Sora technical
report: a network that compresses video in time and space into a latent); Yu et al. 2024,
"Language Model Beats Diffusion" (MAGVIT-v2, arXiv:2310.05737), Sec. 3.1: causal 3D CNN whose
first frame is encoded alone, so an image is a 1-frame video, and "causal" 2D -> 3D inflation;
Yang et al. 2024, CogVideoX (arXiv:2408.06072), Sec. 2.1: 3D causal VAE with 8x8 spatial and 4x
temporal compression; Open-Sora Plan's CausalVAE.

Layout (channels-last): videos `(B, T, H, W, C)` float in [-1, 1]; latents
`(B, 1 + (T - 1) / ft, H / fs, W / fs, latent_channels)` with fs = 2 ** (len(block_out_channels) - 1)
(spatial) and ft = 2 ** sum(temporal_downsample) (temporal). T must be 1 + k * ft; T = 1 is an image.

The network is the LDM encoder / decoder of `ldm_autoencoder.py` with every 3x3 conv replaced by a
`CausalConv3d` (kt x 3 x 3), 1x1 convs by 1x1x1, GroupNorm and the mid-block attention applied
per frame (the causal blocks are in `causal_conv.py`), and:
  - spatial downsample = `CausalConv3d` kt x 3 x 3, stride (st, 2, 2), st = 2 at levels with
    temporal downsampling (bottom/right spatial padding like diffusers' VAE): with the causal
    front padding of kt - 1 frames, output frame j sees input frames 2j - kt + 1 .. 2j, so frame 0
    is alone and 1 + 2k frames -> 1 + k;
  - upsample = nearest x2 in H and W, and at temporal levels in T (each frame repeated, then the
    first copy dropped: 1 + k -> 1 + 2k), followed by a causal kt x 3 x 3 conv.

Causality. Every conv pads only the past, and norms / attention never mix frames, so encoder
latent frame j depends only on input frames <= ft * j, and decoded frames <= ft * j only on latent
frames <= j. The full encode -> decode path is therefore causal at the granularity of the latent
"chunks" {0}, {1..ft}, {ft+1..2ft}, ...: decoded frames <= t never depend on input frames > t when
t is a multiple of ft (every frame when ft = 1). Strict frame-by-frame causality with ft > 1 is
impossible for any compressing autoencoder: frame ft*j - ft + 1 is reconstructed from latent j,
which has seen frame ft*j (tests/models/test_video_vae.py checks both statements).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models import vae
from genjax.models.causal_conv import (TEMPORAL_PADDINGS, CausalConv3d, CausalMidBlock, CausalResnetBlock,
                                       SpaceTimeDownsample, SpaceTimeUpsample, frame_group_norm)
from genjax.models.vae import AutoencoderKL, DiagonalGaussian

Dtype = Any


# --------------------------------------------------------------------------- encoder / decoder


class VideoEncoder(nn.Module):
    """Causal video encoder: conv_in -> [resnets (+ space-time downsample)] per level -> mid block
    -> per-frame norm, SiLU, conv_out. `(B, T, H, W, C_in) -> (B, 1 + (T-1)/ft, H/fs, W/fs,
    out_channels * (2 if double_z else 1))` in `dtype`. Param names are those of `ldm_autoencoder.Encoder`.
    `temporal_downsample[i]` halves T at the downsample after level i."""
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    temporal_downsample: Sequence[bool] = ()
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    double_z: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tkw = dict(temporal_kernel_size=self.temporal_kernel_size,
                   temporal_padding=self.temporal_padding, **kw)
        k3 = (self.temporal_kernel_size, 3, 3)
        ckw = dict(temporal_padding=self.temporal_padding, **kw)
        h = CausalConv3d(self.block_out_channels[0], k3, name="conv_in", **ckw)(x)
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = CausalResnetBlock(ch, self.norm_num_groups, name=f"down_blocks_{i}_resnets_{j}", **tkw)(h)
            if i < len(self.block_out_channels) - 1:
                h = SpaceTimeDownsample(ch, bool(self.temporal_downsample[i]),
                                        name=f"down_blocks_{i}_downsamplers_0", **tkw)(h)
        h = CausalMidBlock(self.norm_num_groups, self.mid_block_attention, attention_impl=self.attention_impl,
                           name="mid_block", **tkw)(h)
        h = nn.silu(frame_group_norm(h, num_groups=self.norm_num_groups, name="conv_norm_out", **kw))
        c = self.out_channels * (2 if self.double_z else 1)
        return CausalConv3d(c, k3, name="conv_out", **ckw)(h)


class VideoDecoder(nn.Module):
    """Causal video decoder: conv_in -> mid block -> [resnets (+ space-time upsample)] per level ->
    per-frame norm, SiLU, conv_out. `(B, t, h, w, c) -> (B, 1 + (t-1)*ft, h*fs, w*fs,
    out_channels)` in `dtype`; upsampling mirrors `temporal_downsample` (the encoder's level i
    downsample is undone by up level `levels - 2 - i`). Param names are those of `ldm_autoencoder.Decoder`."""
    out_channels: int
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    temporal_downsample: Sequence[bool] = ()
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tkw = dict(temporal_kernel_size=self.temporal_kernel_size,
                   temporal_padding=self.temporal_padding, **kw)
        k3 = (self.temporal_kernel_size, 3, 3)
        ckw = dict(temporal_padding=self.temporal_padding, **kw)
        levels = len(self.block_out_channels)
        h = CausalConv3d(self.block_out_channels[-1], k3, name="conv_in", **ckw)(z)
        h = CausalMidBlock(self.norm_num_groups, self.mid_block_attention, attention_impl=self.attention_impl,
                           name="mid_block", **tkw)(h)
        for i, ch in enumerate(reversed(self.block_out_channels)):
            for j in range(self.layers_per_block + 1):
                h = CausalResnetBlock(ch, self.norm_num_groups, name=f"up_blocks_{i}_resnets_{j}", **tkw)(h)
            if i < levels - 1:
                h = SpaceTimeUpsample(ch, bool(self.temporal_downsample[levels - 2 - i]),
                                      name=f"up_blocks_{i}_upsamplers_0", **tkw)(h)
        h = nn.silu(frame_group_norm(h, num_groups=self.norm_num_groups, name="conv_norm_out", **kw))
        return CausalConv3d(self.out_channels, k3, name="conv_out", **ckw)(h)


# --------------------------------------------------------------------------- the autoencoder


class VideoAutoencoderKL(nn.Module):
    """KL-regularised causal video autoencoder (MAGVIT-v2 / CogVideoX-style 3D causal VAE).

    Methods (call with `module.apply(variables, ..., method=...)`):
      encode(x (B, T, H, W, in_channels) float in [-1, 1]) -> DiagonalGaussian with mean / logvar
        float32 `(B, 1 + (T-1)/ft, H/fs, W/fs, latent_channels)`; T = 1 + k*ft (T = 1: an image).
      decode(z (B, t, h, w, latent_channels)) -> (B, 1 + (t-1)*ft, h*fs, w*fs, out_channels),
        about [-1, 1], in `dtype`.
      __call__(x, rng=None, sample_posterior=True) -> (recon, posterior); `rng` is needed when
        sampling (except inside `init`, which uses the mode).
      encode_latents(x, rng=None) -> `(z - shift_factor) * scaling_factor` (z = mode if no rng);
      decode_latents(z) -> decode(z / scaling_factor + shift_factor).

    fs = 2 ** (len(block_out_channels) - 1) (`downsample_factor`), ft = 2 ** sum(temporal_downsample)
    (`temporal_downsample_factor`). Train with `vae.vae_loss(recon, x, posterior, ...)` (it works on
    videos unchanged; pass a per-frame `perceptual_fn` only after folding T into B).

    Attributes are those of `vae.AutoencoderKL` (`attention_impl`: the attention implementation of
    the encoder's and decoder's mid-block attention, see `attention.dot_product_attention`) plus:
      temporal_downsample: one bool per spatial downsample (len(block_out_channels) - 1); True
        also halves T there. Default (True, True, False): 4x temporal, 8x spatial (CogVideoX).
      temporal_kernel_size: kt of every causal conv (1x1 convs stay 1x1x1).
      temporal_padding: "replicate" (copies of the first frame) or "zeros".

    Raises:
      UserError (before compiling): x not 5-D, wrong channel count, H or W not divisible by fs,
        T not 1 mod ft, latent of the wrong rank / channel count, len(temporal_downsample) wrong,
        temporal_kernel_size < 1, unknown temporal_padding, sampling without `rng`.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    temporal_downsample: Sequence[bool] = (True, True, False)
    temporal_kernel_size: int = 3
    temporal_padding: str = "replicate"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_downsample_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    def setup(self):
        levels = len(self.block_out_channels)
        check(len(self.temporal_downsample) == levels - 1, "temporal_downsample",
              tuple(self.temporal_downsample),
              f"must have one bool per spatial downsample (len(block_out_channels) - 1 = {levels - 1})")
        check(self.temporal_kernel_size >= 1, "temporal_kernel_size", self.temporal_kernel_size, "must be >= 1")
        check(self.temporal_padding in TEMPORAL_PADDINGS, "temporal_padding", self.temporal_padding,
              f"must be one of {TEMPORAL_PADDINGS}")
        kw = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_attention=self.mid_block_attention,
                  temporal_downsample=tuple(bool(t) for t in self.temporal_downsample),
                  temporal_kernel_size=self.temporal_kernel_size,
                  temporal_padding=self.temporal_padding, attention_impl=self.attention_impl,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VideoEncoder(self.latent_channels, double_z=True, **kw)
        self.decoder = VideoDecoder(self.out_channels, **kw)
        ckw = dict(kernel_size=(1, 1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = CausalConv3d(2 * self.latent_channels, **ckw)
        if self.use_post_quant_conv:
            self.post_quant_conv = CausalConv3d(self.latent_channels, **ckw)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        check_video(x, self.in_channels, self.downsample_factor, self.temporal_downsample_factor)
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        check(z.ndim == 5 and z.shape[-1] == self.latent_channels, "z.shape", tuple(z.shape),
              f"must be (B, t, h, w, {self.latent_channels}) (latent_channels)")
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    __call__ = vae.autoencode
    encode_latents = vae.encode_latents
    decode_latents = vae.decode_latents


def check_video(x: jax.Array, channels: int, factor: int, temporal_factor: int, field: str = "x") -> None:
    """Raise UserError unless `x` is `(B, T, H, W, channels)` with H, W divisible by `factor` and
    T = 1 + k * temporal_factor."""
    check(x.ndim == 5, f"{field}.shape", tuple(x.shape), "must be (B, T, H, W, C)")
    check(x.shape[-1] == channels, f"{field}.shape[-1]", x.shape[-1],
          f"must equal the model's {channels} input channels")
    check(x.shape[2] % factor == 0 and x.shape[3] % factor == 0, f"{field}.shape[2:4]",
          tuple(x.shape[2:4]), f"H and W must be divisible by the spatial downsampling factor {factor}")
    check((x.shape[1] - 1) % temporal_factor == 0, f"{field}.shape[1]", x.shape[1],
          f"the frame count T must be 1 + k * {temporal_factor} (the temporal downsampling factor)")


# --------------------------------------------------------------------------- inflation


def inflate_kernel(kernel_2d: np.ndarray, kt: int) -> np.ndarray:
    """`(kh, kw, C_in, C_out)` -> `(kt, kh, kw, C_in, C_out)`: the 2D kernel at the last temporal
    tap (the current frame of a causal conv), zeros at the kt - 1 past taps (MAGVIT-v2 Sec. 3.1,
    "causal" inflation; the non-causal "central" scheme puts it at kt // 2)."""
    kernel_2d = np.asarray(kernel_2d)
    out = np.zeros((kt,) + kernel_2d.shape, kernel_2d.dtype)
    out[-1] = kernel_2d
    return out


def inflate_from_2d(params_2d: Any, vae2d: AutoencoderKL | dict[str, Any],
                    **video_kwargs: Any) -> tuple[VideoAutoencoderKL, dict[str, Any]]:
    """Build a `VideoAutoencoderKL` and its params from a trained 2D `vae.AutoencoderKL`.

    Every 2D conv kernel `(kh, kw, I, O)` becomes `inflate_kernel(kernel, kt)`; biases, norms and
    attention weights are copied. With the current-frame-only kernels, replicate or zero causal
    padding, stride-2 temporal downsampling (frame 0 alone) and repeat-and-drop upsampling, a
    1-frame video goes through the inflated VAE exactly as the image through the 2D VAE; in a
    longer video latent frame j is the 2D latent of frame ft*j and decoded frame t the 2D round
    trip of frame ft*ceil(t/ft) (MAGVIT-v2 Sec. 3.1; tests/models/test_video_vae.py checks both
    to <= 1e-5).

    Args:
      params_2d: the 2D VAE's params (boxed from `init` or plain, e.g. from `vae.load_diffusers`).
      vae2d: the 2D `AutoencoderKL` module, or its constructor kwargs.
      **video_kwargs: `VideoAutoencoderKL` attributes (temporal_downsample, temporal_kernel_size,
        temporal_padding, dtype, ...). temporal_downsample defaults to True for the first two
        spatial downsamples (4x temporal when there are at least two).

    Returns:
      (module, params): plain float32 arrays in the tree of `nn.unbox(module.init(...)["params"])`.

    Raises:
      UserError: a `video_kwargs` key that is not a `VideoAutoencoderKL` attribute, or params that
        do not fit the 2D module.
    """
    if isinstance(vae2d, AutoencoderKL):
        vae2d = {k: getattr(vae2d, k) for k in AutoencoderKL.__dataclass_fields__ if k not in ("parent", "name")}
    fields = sorted(set(VideoAutoencoderKL.__dataclass_fields__) - {"parent", "name"})
    for k in list(vae2d) + list(video_kwargs):
        check(k in fields, "inflate_from_2d argument", k, f"must be one of {fields}")
    levels = len(vae2d.get("block_out_channels", AutoencoderKL.block_out_channels))
    kw = {"temporal_downsample": tuple(i < 2 for i in range(levels - 1)), **vae2d, **video_kwargs}
    module = VideoAutoencoderKL(**kw)
    fs, ft = module.downsample_factor, module.temporal_downsample_factor
    x = jnp.zeros((1, 1 + ft, fs, fs, module.in_channels))
    target = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), x))["params"])
    source = nn.unbox(params_2d)
    flat_src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}

    def inflate(path, want):
        key = jax.tree_util.keystr(path)
        have = flat_src.pop(key, None)
        check(have is not None, "params_2d", key, "is missing (params do not fit the 2D module)")
        have = np.asarray(have, np.float32)
        if len(want.shape) == have.ndim + 1:
            have = inflate_kernel(have, want.shape[0])
        check(have.shape == want.shape, f"params_2d{key}", have.shape,
              f"the video model needs {want.shape} after inflation")
        return jnp.asarray(have)

    params = jax.tree_util.tree_map_with_path(inflate, target)
    check(not flat_src, "params_2d", sorted(flat_src)[:3], "has entries the 2D module does not have")
    return module, params


# --------------------------------------------------------------------------- variants

VARIANTS: dict[str, dict[str, Any]] = {
    # SD AutoencoderKL widths inflated to 3D: 8x spatial, 4x temporal (CogVideoX layout);
    # inflate stabilityai/sd-vae-ft-ema with `inflate_from_2d(*vae.load_diffusers(path)[::-1])`.
    "sd-inflated": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32,
                        scaling_factor=0.18215, temporal_downsample=(True, True, False)),
    # Moving MNIST 64x64x1 on a CPU: 4x spatial, 4x temporal, so a 17-frame clip -> 5 latent
    # frames of 16x16x4 (16x fewer values); 496,269 params. XLA cost analysis per 17x64x64 clip:
    # 5.1 GFLOP forward, 15.3 forward + backward (widths (32, 64, 64) would cost 60 / 179).
    "tiny": dict(in_channels=1, out_channels=1, block_out_channels=(8, 16, 32),
                 layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=1.0,
                 temporal_downsample=(True, True)),
}


def Model(*, variant: str | None = None, **kw: Any) -> VideoAutoencoderKL:
    """`VideoAutoencoderKL` from a named variant (see `VARIANTS`), updated with `kw`.

    Raises UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant,
          f"must be one of {sorted(VARIANTS)}")
    return VideoAutoencoderKL(**{**(VARIANTS[variant] if variant else {}), **kw})
