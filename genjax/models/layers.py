"""Shared layers: MLP, norms, embeddings, heads projections, (un)patchify, size table, remat policies,
scan-over-layers.

Attention lives in `genjax.models.attention`.

Dimension letters, used in shapes and einsum strings across genjax/models:

  B  batch (examples)                  T  frames
  H  height (pixels, latents or patches) W  width
  C  channels                          L  tokens (query length)
  S  context tokens (key/value length in cross-attention)
  D  model width                       N  attention heads
  K  head dim (D = N * K)              P  values per patch (pt * ph * pw * C)

Arrays are channels-last: images `(B, H, W, C)`, videos `(B, T, H, W, C)`, tokens `(B, L, D)`.
Patch sizes are tuples in tensor-axis order, e.g. `(ph, pw)`.

Every module takes `dtype` (compute) and `param_dtype` (storage); layer norms, softmax and
timestep sinusoids compute in float32. Parameters carry logical axis names from
`genjax.parallel.axes` (`init` returns `nn.Partitioned` boxes; `apply` takes boxed or plain).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.parallel.axes import BATCH, CONV_IN, CONV_OUT, EMBED, HEADS, KV, LAYERS, LENGTH, MLP, NORM

Dtype = Any
Array = jax.Array

xavier_uniform = nn.initializers.xavier_uniform()

# Transformer sizes (depth, width D, heads N): ViT / DeiT (Dosovitskiy et al. 2021 Table 1; Ti from
# Touvron et al. 2021) and DiT (Peebles & Xie 2023 Table 1, which adds XL). Models pick their names.
SIZES: dict[str, tuple[int, int, int]] = {
    "Ti": (12, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
}

# `remat` values of the deep stacks -> jax checkpoint policy (None: no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def logical(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """`init` whose parameter carries the logical axis `names` (`genjax.parallel.axes`)."""
    return nn.with_logical_partitioning(init, names)


def zeros(names: tuple[str | None, ...]) -> Callable:
    """Zero initialiser with logical axis `names` (adaLN-Zero modulations, zero-init projections)."""
    return logical(nn.initializers.zeros, names)


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(t: Array, dim: int, *, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0) -> Array:
    """Sinusoidal timestep embedding.

    `freqs[i] = exp(-log(max_period) * i / (dim // 2 - downscale_freq_shift))`, `args = t * freqs`,
    output `[cos(args), sin(args)]` if `flip_sin_to_cos` else `[sin, cos]`, zero-padded by one
    column if `dim` is odd.

    Args:
      t: `(B,)` timesteps, int or float (fractional allowed), typically in [0, 1000).
      dim: output width.
      max_period: the longest period, in units of t.
      flip_sin_to_cos: cos first (DiT, diffusers DiT / SD U-Net) or sin first.
      downscale_freq_shift: 0 in DiT (`TimestepEmbedder.timestep_embedding`) and SD; 1 in
        diffusers' `DiTTransformer2DModel` and DDPM.
      scale: multiplies `args`.

    Returns:
      `(B, dim)` float32, values in [-1, 1].

    Source: Vaswani et al. 2017 sec. 3.5; Peebles & Xie 2023 (DiT `models.py`); matches
      `diffusers.models.embeddings.get_timestep_embedding` (checked in tests).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = scale * jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    first, second = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    emb = jnp.concatenate([first, second], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def sincos_pos_embed_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1D sin-cos position embedding `[sin(pos * omega), cos(pos * omega)]`, omega_i = 10000^(-2i/D).

    Args:
      embed_dim: D, even.
      pos: positions, any shape with M values (flattened), float.

    Returns:
      `(M, D)` float64 numpy.

    Raises:
      UserError: `embed_dim` odd.

    Source: MAE `get_1d_sincos_pos_embed_from_grid` (He et al. 2022), used by DiT.
    """
    check(embed_dim % 2 == 0, "embed_dim", embed_dim, "must be even for sin-cos position embeddings")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, *, base_size: int | None = None,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """Fixed 2D sin-cos position embedding of a `grid_h x grid_w` patch grid, row-major tokens.

    The first D/2 columns encode the column (w) coordinate, the last D/2 the row (h) coordinate,
    as in MAE / DiT (whose `meshgrid(grid_w, grid_h)` puts w first). With `base_size`, coordinates
    are `arange(g) * base_size / g / interpolation_scale` (diffusers `PatchEmbed` when the input grid
    differs from the training grid); without it they are `arange(g)`.

    Args:
      embed_dim: D, divisible by 4.
      grid_h, grid_w: patch-grid size (non-square allowed).
      base_size: training grid side for diffusers-style position interpolation, or None.
      interpolation_scale: diffusers' `interpolation_scale`.

    Returns:
      `(grid_h * grid_w, D)` float32 numpy; token index = h * grid_w + w.

    Raises:
      UserError: `embed_dim` not divisible by 4.

    Source: MAE `get_2d_sincos_pos_embed` (He et al. 2022), DiT `models.py`; diffusers
      `get_2d_sincos_pos_embed` (checked in tests).
    """
    check(embed_dim % 4 == 0, "embed_dim", embed_dim, "must be divisible by 4 for 2D sin-cos positions")
    hs = np.arange(grid_h, dtype=np.float64)
    ws = np.arange(grid_w, dtype=np.float64)
    if base_size is not None:
        hs = hs / (grid_h / base_size) / interpolation_scale
        ws = ws / (grid_w / base_size) / interpolation_scale
    hh, ww = np.meshgrid(hs, ws, indexing="ij")  # (H, W) each
    emb = np.concatenate([sincos_pos_embed_1d(embed_dim // 2, ww), sincos_pos_embed_1d(embed_dim // 2, hh)], 1)
    return emb.astype(np.float32)


def sincos_embed(pos: Array, dim: int) -> Array:
    """`[sin(pos * omega), cos(pos * omega)]`, omega_i = 10000^(-2i/dim): `(...,)` -> `(..., dim)` float32.

    The formula of `sincos_pos_embed_1d` (MAE) in jax, so positions may be traced (packed tokens).
    """
    omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    out = jnp.asarray(pos).astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)


def sincos_pos_embed_at(embed_dim: int, coords: Array) -> Array:
    """`sincos_pos_embed_2d` at given (h, w) coordinates: `(..., 2)` -> `(..., D)` float32 (w block first).

    For tokens whose grid is not a regular array (NaViT-packed images); float32, so it equals the
    float64 table of `sincos_pos_embed_2d` to about 1e-6 at coordinates below 100.

    Raises:
      UserError: `embed_dim` not divisible by 4.
    """
    check(embed_dim % 4 == 0, "embed_dim", embed_dim, "must be divisible by 4 for 2D sin-cos positions")
    return jnp.concatenate([sincos_embed(coords[..., 1], embed_dim // 2), sincos_embed(coords[..., 0], embed_dim // 2)],
                           axis=-1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoid (float32) -> Dense -> SiLU -> Dense: `(B,)` -> `(B, D)`.

    Submodules `linear_1`, `linear_2` (diffusers `TimestepEmbedding` names). Weights init
    normal(0.02) as DiT. Source: DiT `TimestepEmbedder` (Peebles & Xie 2023).
    """

    features: int
    frequency_embedding_size: int = 256
    max_period: float = 10000.0
    flip_sin_to_cos: bool = True
    downscale_freq_shift: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        freq = timestep_embedding(t, self.frequency_embedding_size, max_period=self.max_period,
                                  flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift)
        init = nn.initializers.normal(0.02)
        h = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical(init, (None, MLP)), bias_init=zeros((MLP,)),
                     name="linear_1")(freq)
        h = nn.silu(h)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(init, (MLP, EMBED)), bias_init=zeros((EMBED,)),
                        name="linear_2")(h)


# --------------------------------------------------------------------------- basic layers


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, computed in float32, output in `dtype`.

    Params `scale`, `bias` (D,) with logical axis `norm` (absent if `use_scale`/`use_bias` False).
    Shapes: `(..., D)` -> `(..., D)`.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.LayerNorm(epsilon=self.epsilon, use_scale=self.use_scale, use_bias=self.use_bias,
                         dtype=jnp.float32, param_dtype=self.param_dtype,
                         scale_init=logical(nn.initializers.ones, (NORM,)),
                         bias_init=zeros((NORM,)), name="norm")(x.astype(jnp.float32))
        return y.astype(self.dtype)


class HeadsRMSNorm(nn.Module):
    """RMS norm over all heads together (Wan's `qk_norm="rms_norm_across_heads"`, torch `RMSNorm` over
    the N*K projected width): `(B, L, N, K)` -> same shape, mean square in float32, output in `dtype`.
    Param `scale (N, K)`, init ones, axes `(heads, kv)`."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", logical(nn.initializers.ones, (HEADS, KV)), x.shape[-2:], self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.epsilon)
        return (y * jnp.asarray(scale, jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
    """Dense(D -> hidden) -> activation -> Dense(hidden -> out): `(..., D)` -> `(..., out)`.

    Submodules `fc1` (kernel axes `(embed, mlp)`), `fc2` (`(mlp, embed)`). The default activation
    is GELU with the tanh approximation, as DiT's `approx_gelu` and diffusers "gelu-approximate".
    Source: timm `Mlp` as used by DiT.
    """

    hidden_features: int
    out_features: int | None = None
    activation: Callable[[Array], Array] = functools.partial(nn.gelu, approximate=True)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = self.out_features or x.shape[-1]
        h = nn.Dense(self.hidden_features, use_bias=self.use_bias, dtype=self.dtype,
                     param_dtype=self.param_dtype, kernel_init=logical(xavier_uniform, (EMBED, MLP)),
                     bias_init=zeros((MLP,)), name="fc1")(x)
        h = self.activation(h)
        return nn.Dense(out, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=logical(xavier_uniform, (MLP, EMBED)),
                        bias_init=zeros((EMBED,)), name="fc2")(h)


# --------------------------------------------------------------------------- patches


def patchify(x: Array, patch_size: tuple[int, int]) -> Array:
    """`(B, H, W, C)` -> `(B, (H/ph)*(W/pw), ph*pw*C)`; tokens row-major, values ordered (ph, pw, C).

    Raises:
      UserError: H or W not divisible by the patch size.

    Source: DiT `unpatchify` (`nhwpqc->nchpwq`), in channels-last form.
    """
    ph, pw = patch_size
    check(x.shape[1] % ph == 0 and x.shape[2] % pw == 0, "image (H, W)", tuple(x.shape[1:3]),
          f"must be divisible by the patch size {(ph, pw)}")
    return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=ph, q=pw)


def unpatchify(tokens: Array, grid: tuple[int, int], patch_size: tuple[int, int]) -> Array:
    """Inverse of `patchify`: `(B, h*w, ph*pw*C)` with `grid = (h, w)` -> `(B, h*ph, w*pw, C)`.

    Raises:
      UserError: token count or width inconsistent with grid and patch size.
    """
    (h, w), (ph, pw) = grid, patch_size
    check(tokens.shape[1] == h * w, "tokens.shape[1]", tokens.shape[1], f"must equal grid h*w={h * w}")
    check(tokens.shape[2] % (ph * pw) == 0, "tokens.shape[2]", tokens.shape[2], f"must be divisible by {ph * pw}")
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=ph, q=pw)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv with kernel = stride = patch, `(B, H, W, C)` -> `(B, L, D)`.

    Submodule `proj` is an `nn.Conv` (kernel `(ph, pw, C, D)`, axes `(None, None, conv_in, conv_out)`)
    — diffusers `PatchEmbed.proj` (torch `(D, C, ph, pw)`) transposed. Tokens row-major over the
    `(H/ph, W/pw)` grid. Init xavier-uniform over the flattened `(ph*pw*C, D)` kernel, as DiT.

    Raises:
      UserError: H or W not divisible by the patch size.
    """

    features: int
    patch_size: tuple[int, int] = (2, 2)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.patch_size
        check(x.shape[1] % ph == 0 and x.shape[2] % pw == 0, "image (H, W)", tuple(x.shape[1:3]),
              f"must be divisible by the patch size {(ph, pw)}")
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        y = nn.Conv(self.features, (ph, pw), strides=(ph, pw), padding="VALID", use_bias=self.use_bias,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(init, (None, None, CONV_IN, CONV_OUT)),
                    bias_init=zeros((CONV_OUT,)), name="proj")(x)
        y = einops.rearrange(y, "b h w d -> b (h w) d")
        return nn.with_logical_constraint(y, (BATCH, LENGTH, None))


class HeadsDense(nn.Module):
    """`nn.DenseGeneral` contracting the last `in_axes` input axes into `features`, with its kernel
    created at its final shape `(*in, *features)`: its logical axis names then describe the real
    axes, so the sharding constraint a boxed parameter implies under a mesh applies (flax's
    DenseGeneral initialises a flattened 2-D kernel, which a 3-name logical box rejects there).
    The initialiser sees the flattened `(fan_in, fan_out)` shape, as in DenseGeneral, so
    parameters and outputs are the same numbers.

    Params: `kernel (*in, *features)` with `kernel_names`, `bias features` with `bias_names`.
    """

    features: tuple[int, ...]
    kernel_names: tuple[str | None, ...]
    bias_names: tuple[str | None, ...]
    in_axes: int = 1
    use_bias: bool = True
    kernel_init: Callable = xavier_uniform
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.in_axes:]
        flat = (int(np.prod(in_shape)), int(np.prod(self.features)))

        def init(rng, shape, dtype):
            return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

        kernel = self.param("kernel", logical(init, self.kernel_names), (*in_shape, *self.features),
                            self.param_dtype)
        bias = self.param("bias", zeros(self.bias_names), self.features, self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias



# --------------------------------------------------------------------------- deep stacks


def _scan_body(block: nn.Module, x: Array, *args):
    return block(x, *args), None


def stack_blocks(block_cls: type[nn.Module], block_kw: dict[str, Any], depth: int, name: str, x: Array,
                 *args, scan: bool = False, remat: str = "none") -> Array:
    """`depth` blocks `block_cls(**block_kw)` applied in turn: `x = block(x, *args)`.

    Call only inside an `@nn.compact` method (the blocks become its submodules). Unrolled, the
    blocks are `{name}_0 .. {name}_{depth-1}`; with `scan` one `nn.scan`ned block `name` whose
    params have a leading `layers` axis of size depth (same numbers, one compiled body). `args`
    are broadcast to every block (positional; None allowed). `remat` names a `REMAT_POLICIES`
    entry applied per block.

    Raises:
      UserError: unknown remat.
    """
    check(remat in REMAT_POLICIES, "remat", remat, f"must be one of {sorted(REMAT_POLICIES)}")
    cls = block_cls
    if remat != "none":
        cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        stack = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,) * len(args), length=depth,
                        metadata_params={nn.PARTITION_NAME: LAYERS})
        return stack(cls(**block_kw, name=name), x, *args)[0]
    for i in range(depth):
        x = cls(**block_kw, name=f"{name}_{i}")(x, *args)
    return x
