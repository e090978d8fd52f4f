"""ViViT: tubelet embedding and joint / factorised space-time transformer encoders.

Arnab et al. 2021, "ViViT: A Video Vision Transformer" (arXiv:2103.15691). Dimension letters are
defined in `genjax.models.layers`; `grid = (nt, nh, nw)` is the tubelet grid of a video.

  video (B, T, H, W, C) -> TubeletEmbed (sec. 3.2, eq. 8)             -> tokens (B, L, D), L = nt*nh*nw
  (or packed tubelets (B, L, P) + segment_ids (B, L) + positions (B, L, 3), NaViT layout)
  + FactorisedPosEmbed(t, h, w)                                       -> (B, L, D)
  ViViTEncoder, attention =
    "joint"                     model 1: every block attends over all tokens (sec. 3.3)
    "factorised_encoder"        model 2: spatial transformer per frame, mean-pooled per frame,
                                then a temporal transformer over the frames
    "factorised_self_attention" model 3: each block = spatial MSA, temporal MSA, MLP (eqs. 7-9)
  ViViTClassifier: mean-pool (or CLS) -> LayerNorm -> Dense(num_classes)

Token order is (t, h, w) row-major and values inside a tubelet are ordered (pt, ph, pw, C), the
order of `genjax.data.packing`. Regular grids run factorised attention by reshaping
`(B, nt*nh*nw, D)`; packed sequences run it with `attention.Attention`'s segment masks, where the
"segments" are the groups same-example-and-same-t (spatial) or same-example-and-same-(h, w)
(temporal), numbered by `group_ids`. Both give the same numbers (tested).
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.attention import Attention, factorised_attention
from genjax.models.layers import REMAT_POLICIES, SIZES, LayerNorm, Mlp, PatchEmbed, logical, stack_blocks, zeros
from genjax.parallel.axes import BATCH, CONV_IN, CONV_OUT, EMBED, LENGTH

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

ATTENTION_KINDS = ("joint", "factorised_encoder", "factorised_self_attention")
POS_EMBED_KINDS = ("learned", "sincos", "fractional")
POOL_KINDS = ("mean", "cls")
INFLATION_METHODS = ("central_frame", "filter_inflation")


# --------------------------------------------------------------------------- tubelets


def _check_video(x, patch_size, in_channels=None) -> Grid:
    check(x.ndim == 5, "video.shape", tuple(x.shape), "must be (B, T, H, W, C)")
    check(all(s % p == 0 for s, p in zip(x.shape[1:4], patch_size)), "video (T, H, W)",
          tuple(x.shape[1:4]), f"must be divisible by the tubelet size {tuple(patch_size)}")
    if in_channels is not None:
        check(x.shape[-1] == in_channels, "video.shape[-1]", x.shape[-1], f"must equal in_channels={in_channels}")
    return tuple(s // p for s, p in zip(x.shape[1:4], patch_size))


def patchify_3d(video: Array, patch_size: Grid) -> tuple[Array, Grid]:
    """Cut videos into tubelets: `(B, T, H, W, C)` -> `(B, nt*nh*nw, pt*ph*pw*C)`, grid.

    Tokens are (t, h, w) row-major, values within a tubelet ordered (pt, ph, pw, C) — the order
    of `genjax.data.packing.patchify_video` and, for pt = 1, of `layers.patchify` per frame.

    Raises:
      UserError: not 5-D, or T, H, W not divisible by `patch_size`.

    Source: ViViT sec. 3.2 "tubelet embedding".
    """
    grid = _check_video(video, patch_size)
    pt, ph, pw = patch_size
    tokens = einops.rearrange(video, "b (t p) (h q) (w r) c -> b (t h w) (p q r c)", p=pt, q=ph, r=pw)
    return tokens, grid


def unpatchify_3d(tokens: Array, grid: Grid, patch_size: Grid) -> Array:
    """Inverse of `patchify_3d`: `(B, nt*nh*nw, pt*ph*pw*C)` -> `(B, nt*pt, nh*ph, nw*pw, C)`.

    Raises:
      UserError: token count not `prod(grid)` or width not a multiple of `pt*ph*pw`.
    """
    (nt, nh, nw), (pt, ph, pw) = grid, patch_size
    check(tokens.ndim == 3 and tokens.shape[1] == nt * nh * nw and tokens.shape[2] % (pt * ph * pw) == 0,
          "tokens.shape", tuple(tokens.shape), f"must be (B, {nt * nh * nw}, pt*ph*pw*C) for grid={tuple(grid)}")
    return einops.rearrange(tokens, "b (t h w) (p q r c) -> b (t p) (h q) (w r) c",
                            t=nt, h=nh, w=nw, p=pt, q=ph, r=pw)


def grid_positions(grid: Grid) -> np.ndarray:
    """(t, h, w) coordinates of the tokens of a regular grid: `(nt*nh*nw, 3)` int32, row-major."""
    return np.indices(grid, dtype=np.int32).reshape(3, -1).T


def inflate_patch_kernel(kernel_2d: Array, pt: int, method: str = "central_frame") -> Array:
    """Inflate a 2D patch-embedding kernel `(ph, pw, C, D)` to a tubelet kernel `(pt, ph, pw, C, D)`.

    - "central_frame": the 2D kernel at temporal index `pt // 2`, zeros elsewhere (ViViT sec. 3.4
      "central frame initialisation").
    - "filter_inflation": the 2D kernel replicated along time and divided by pt (ViViT sec. 3.4,
      after I3D, Carreira & Zisserman 2017).

    Either way a static video (identical frames) embeds exactly as one frame through the 2D
    kernel. Use the result as `TubeletEmbed`'s `kernel` (e.g. from `PatchEmbed`'s `proj.kernel`);
    the bias carries over unchanged.

    Raises:
      UserError: kernel not 4-D, pt < 1, or unknown method.
    """
    check(jnp.ndim(kernel_2d) == 4, "kernel_2d.shape", jnp.shape(kernel_2d), "must be (ph, pw, C, D)")
    check(isinstance(pt, int) and pt >= 1, "pt", pt, "must be an int >= 1")
    check(method in INFLATION_METHODS, "method", method, f"must be one of {INFLATION_METHODS}")
    kernel_2d = jnp.asarray(kernel_2d)
    if method == "filter_inflation":
        return jnp.broadcast_to(kernel_2d / pt, (pt, *kernel_2d.shape))
    return jnp.zeros((pt, *kernel_2d.shape), kernel_2d.dtype).at[pt // 2].set(kernel_2d)


def uniform_frame_sampling(video: Array, num_frames: int) -> Array:
    """Pick `num_frames` frames uniformly spread over T: `(B, T, H, W, C)` -> `(B, num_frames, H, W, C)`.

    Frame i is `floor((i + 1/2) * T / num_frames)` (the centre of the i-th of num_frames equal
    temporal bins). Follow with `FramePatchEmbed` (or `TubeletEmbed` with pt = 1).

    Raises:
      UserError: not 5-D, or num_frames not in [1, T].

    Source: ViViT sec. 3.2 "uniform frame sampling".
    """
    check(video.ndim == 5, "video.shape", tuple(video.shape), "must be (B, T, H, W, C)")
    t = video.shape[1]
    check(isinstance(num_frames, int) and 1 <= num_frames <= t, "num_frames", num_frames, f"must be in [1, T={t}]")
    idx = np.floor((np.arange(num_frames) + 0.5) * t / num_frames).astype(np.int32)
    return video[:, idx]


class TubeletEmbed(nn.Module):
    """Tubelet embedding: 3D patchify + linear projection (= Conv3D with stride = kernel).

    Params `kernel (pt, ph, pw, C, D)` (axes `(None, None, None, conv_in, conv_out)`, the layout of
    a flax 3D conv kernel; `inflate_patch_kernel` makes one from a 2D `PatchEmbed`) and
    `bias (D,)`. Init xavier-uniform over the flattened `(P, D)` kernel, as ViT / DiT.

    Call with a video `(B, T, H, W, C)` -> `(tokens (B, nt*nh*nw, D), grid (nt, nh, nw))`, or with
    pre-patchified packed tubelets `(B, L, P)` (values in (pt, ph, pw, C) order, as
    `genjax.data.packing`) -> `(tokens (B, L, D), None)`. Both paths use the same matmul, so a
    token embeds identically either way. Output in `dtype`.

    Raises:
      UserError: wrong rank; T, H, W not divisible by the tubelet; channels != in_channels; P not
        `pt*ph*pw*in_channels`.

    Source: ViViT sec. 3.2 eq. 8; matches transformers `VivitTubeletEmbeddings` (tested).
    """

    features: int
    patch_size: Grid = (2, 16, 16)
    in_channels: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Grid | None]:
        pt, ph, pw = self.patch_size
        p = pt * ph * pw * self.in_channels
        if x.ndim == 5:
            _check_video(x, self.patch_size, self.in_channels)
            x, grid = patchify_3d(x, self.patch_size)
        else:
            check(x.ndim == 3 and x.shape[-1] == p, "tubelets.shape", tuple(x.shape),
                  f"must be a video (B, T, H, W, C) or packed tubelets (B, L, P={p})")
            grid = None
        init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        kernel = self.param("kernel", logical(init, (None, None, None, CONV_IN, CONV_OUT)),
                            (pt, ph, pw, self.in_channels, self.features), self.param_dtype)
        y = jnp.einsum("blp,pd->bld", x.astype(self.dtype), jnp.asarray(kernel, self.dtype).reshape(p, -1))
        if self.use_bias:
            bias = self.param("bias", zeros((CONV_OUT,)), (self.features,),
                              self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return nn.with_logical_constraint(y, (BATCH, LENGTH, None)), grid


class FramePatchEmbed(nn.Module):
    """Uniform frame sampling + 2D patch embedding of each frame (ViViT sec. 3.2).

    `(B, T, H, W, C)` -> optional `uniform_frame_sampling` to `num_frames` -> `layers.PatchEmbed`
    (submodule `patch_embed`, so an image ViT / DiT patch embedding loads directly) on every
    frame -> `(tokens (B, n*nh*nw, D), grid (n, nh, nw))`, tokens in (t, h, w) order. Equal to
    `TubeletEmbed` with pt = 1 and kernel `kernel_2d[None]` (tested).

    Raises:
      UserError: not 5-D, channels != in_channels, H or W not divisible by the patch, num_frames
        out of range.
    """

    features: int
    patch_size: tuple[int, int] = (16, 16)
    in_channels: int = 3
    num_frames: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Grid]:
        grid = _check_video(x, (1, *self.patch_size), self.in_channels)
        if self.num_frames is not None:
            x = uniform_frame_sampling(x, self.num_frames)
            grid = (self.num_frames, *grid[1:])
        b = x.shape[0]
        frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
        y = PatchEmbed(self.features, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="patch_embed")(frames)
        return einops.rearrange(y, "(b t) s d -> b (t s) d", b=b), grid


# --------------------------------------------------------------------------- positions


def _sincos(pos: Array, dim: int) -> Array:
    """`[sin(pos * omega), cos(pos * omega)]`, omega_i = 10000^(-2i/dim): `(...,)` -> `(..., dim)` f32.

    The formula of `layers.sincos_pos_embed_1d` (MAE), in jax so positions may be traced.
    """
    omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    out = pos.astype(jnp.float32)[..., None] * omega
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)


def sincos_split(features: int) -> tuple[int, int, int]:
    """Channel widths (D_t, D_h, D_w) of the (t, h, w) sin-cos blocks: D_h = D_w = 2*floor(D/6)."""
    part = 2 * (features // 6)
    return features - 2 * part, part, part


def segment_grid_sizes(segment_ids: Array, positions: Array) -> Array:
    """Per-token grid size of its example, `max position + 1` over its segment: `(B, L, 3)` int32.

    Segment ids must lie in [0, L] (the packer numbers them 1..k). Exact for whole examples; with
    NaViT token dropping the last row / column may be gone, so pass the packer's `example_shape`
    instead. Padding tokens (segment 0) get their padding group's value (unused).
    """
    b, l = segment_ids.shape
    flat = (jnp.arange(b)[:, None] * (l + 1) + segment_ids).reshape(-1)  # one id per (row, segment)
    top = jax.ops.segment_max(positions.reshape(-1, 3), flat, num_segments=b * (l + 1))
    return (top[flat] + 1).reshape(b, l, 3).astype(jnp.int32)


class FactorisedPosEmbed(nn.Module):
    """Factorised (t, h, w) absolute position embedding of tokens: positions `(B, L, 3)` -> `(B, L, D)`.

    kind:
      "learned"    e_t[t] + e_h[h] + e_w[w]: three tables `(max_t, D)`, `(max_h, D)`, `(max_w, D)`
                   (params `time`, `height`, `width`, normal(0.02)); NaViT sec. 3.4 factorised
                   embeddings. Positions must lie in [0, max); larger ones are clipped to max - 1
                   (they cannot be checked under jit).
      "sincos"     fixed MAE sin-cos of the integer coordinates, each axis in its own channel
                   block (widths `sincos_split(D)`, order t, h, w) — the sum of per-axis
                   embeddings zero outside their block, so the axes stay distinguishable.
      "fractional" as "sincos" of the fractional coordinate `pos / grid_size * max_axis`
                   (NaViT sec. 3.4 "fractional" coordinates, rescaled onto the `max_*` grid so the
                   sinusoids keep their resolution): a token keeps its embedding when its video
                   is resampled to another grid with the same relative position; on a grid of
                   size `(max_t, max_h, max_w)` it equals "sincos".

    Call: `positions (B, L, 3)` int (t, h, w); `grid_sizes` `(B, L, 3)` or `(3,)` each token's
    example grid (only "fractional"; default `segment_grid_sizes(segment_ids, positions)`).
    Returns `(B, L, D)` in `dtype` (computed in float32).

    Raises:
      UserError: unknown kind, D not even (sin-cos kinds), positions not `(B, L, 3)`,
        fractional without grid_sizes or segment_ids.
    """

    features: int
    max_t: int
    max_h: int
    max_w: int
    kind: str = "learned"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: Array, *, grid_sizes: Array | None = None,
                 segment_ids: Array | None = None) -> Array:
        check(self.kind in POS_EMBED_KINDS, "pos_embed", self.kind, f"must be one of {POS_EMBED_KINDS}")
        check(positions.ndim == 3 and positions.shape[-1] == 3, "positions.shape", tuple(positions.shape),
              "must be (B, L, 3) as (t, h, w)")
        maxes = (self.max_t, self.max_h, self.max_w)
        if self.kind == "learned":
            out = jnp.zeros((*positions.shape[:2], self.features), jnp.float32)
            for axis, (name, n) in enumerate(zip(("time", "height", "width"), maxes)):
                table = self.param(name, logical(nn.initializers.normal(0.02), (None, EMBED)),
                                   (n, self.features), self.param_dtype)
                out = out + jnp.take(jnp.asarray(table, jnp.float32), positions[..., axis], axis=0, mode="clip")
            return out.astype(self.dtype)
        check(self.features % 2 == 0, "features", self.features, "must be even for sin-cos position embeddings")
        pos = positions.astype(jnp.float32)
        if self.kind == "fractional":
            check(grid_sizes is not None or segment_ids is not None, "grid_sizes", None,
                  "fractional positions need grid_sizes or segment_ids")
            if grid_sizes is None:
                grid_sizes = segment_grid_sizes(segment_ids, positions)
            pos = pos / jnp.asarray(grid_sizes, jnp.float32) * jnp.asarray(maxes, jnp.float32)
        out = jnp.concatenate([_sincos(pos[..., i], w) for i, w in enumerate(sincos_split(self.features))], -1)
        return out.astype(self.dtype)


# --------------------------------------------------------------------------- packed groups


def group_ids(segment_ids: Array, keys: Array) -> Array:
    """Number the groups of tokens that share a segment and a key: `(B, L)` int32, 0 = padding.

    Token l's id is 1 + the index of the first token of its group, so ids are equal exactly
    within a group and a token is its group's representative iff `id == index + 1`. Built from
    the `(B, L, L)` equality mask in one vectorised step (no loop over examples).

    Args:
      segment_ids: `(B, L)` int, 0 = padding.
      keys: `(B, L, K)` int, e.g. `positions[..., :1]` (same frame) or `positions[..., 1:]`
        (same spatial location).

    Source: NaViT (Dehghani et al. 2023) sec. 2.2 masked attention, applied to ViViT's factorised
      attention (sec. 3.3 models 2-3).
    """
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.all(
        keys[:, :, None, :] == keys[:, None, :, :], axis=-1)
    first = jnp.argmax(same, axis=-1).astype(jnp.int32)
    return jnp.where(segment_ids != 0, first + 1, 0)


def _group_mean(x: Array, ids: Array) -> Array:
    """Each token replaced by the mean of its group (`ids` from `group_ids`), in float32."""
    same = ((ids[:, :, None] == ids[:, None, :]) & (ids != 0)[:, :, None]).astype(jnp.float32)
    total = jnp.einsum("bls,bsd->bld", same, x.astype(jnp.float32))
    return total / jnp.maximum(same.sum(-1, keepdims=True), 1.0)


# --------------------------------------------------------------------------- blocks


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MSA(LN(x)), then + MLP(LN(.)): `(B, L, D)` -> `(B, L, D)`.

    Submodules `norm1`, `attn` (`attention.Attention`), `norm2`, `mlp` (`layers.Mlp`, GELU tanh
    approximation as flax / Scenic ViViT). LayerNorm eps 1e-6, float32.
    Call `(x, segment_ids=None, kv_mask=None)`: `segment_ids (B, L)` restricts attention to equal
    nonzero ids; `kv_mask (B, L)` bool, False = key not attended.

    Source: ViT (Dosovitskiy et al. 2021) eqs. 2-3; ViViT eqs. 4-5; matches transformers
      `VivitLayer` (tested).
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None = None, kv_mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(epsilon=1e-6, **kw, name="norm1")(x)
        x = x + Attention(self.num_heads, **kw, name="attn")(h, segment_ids=segment_ids, context_mask=kv_mask)
        h = LayerNorm(epsilon=1e-6, **kw, name="norm2")(x)
        x = x + Mlp(self.mlp_dim, **kw, name="mlp")(h)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class FactorisedSelfAttentionBlock(nn.Module):
    """ViViT model 3 block: spatial MSA, then temporal MSA, then MLP, each pre-LN with a residual.

    `(B, L, D)` -> `(B, L, D)`. Spatial attention is among tokens of the same frame, temporal
    among tokens at the same (h, w). With `grid = (nt, nh, nw)` (regular tokens, L = nt*nh*nw)
    this reshapes to `(B*nt, nh*nw, D)` / `(B*nh*nw, nt, D)`; with `grid=None` it takes packed
    group ids `frame_ids`, `location_ids` (`group_ids` of (segment, t) and (segment, h, w)).
    Submodules `norm_spatial`, `attn_spatial`, `norm_temporal`, `attn_temporal`, `norm_mlp`, `mlp`.

    Source: ViViT sec. 3.3 model 3, eqs. 7-9.
    """

    num_heads: int
    mlp_dim: int
    grid: Grid | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, frame_ids: Array | None = None, location_ids: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for axis, ids in (("spatial", frame_ids), ("temporal", location_ids)):
            h = LayerNorm(epsilon=1e-6, **kw, name=f"norm_{axis}")(x)
            attn = Attention(self.num_heads, **kw, name=f"attn_{axis}")
            x = x + factorised_attention(attn, h, axis, grid=self.grid, group_ids=ids)
        h = LayerNorm(epsilon=1e-6, **kw, name="norm_mlp")(x)
        x = x + Mlp(self.mlp_dim, **kw, name="mlp")(h)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


# --------------------------------------------------------------------------- encoder


class ViViTEncoder(nn.Module):
    """ViViT transformer encoder over tubelet tokens: `(B, L, D)` -> `(B, L, D)` in `dtype`.

    Attributes:
      num_layers: blocks (model 2: spatial blocks). num_heads: N. mlp_dim: MLP hidden width.
      attention: "joint" (model 1, blocks `blocks_i`), "factorised_encoder" (model 2:
        `spatial_i` per frame -> mean over the frame's tokens -> `temporal_i` over frames; every
        token outputs its frame's temporal output, so a mean over tokens is a mean over frames),
        "factorised_self_attention" (model 3, `blocks_i` = `FactorisedSelfAttentionBlock`).
      num_temporal_layers: model 2's temporal depth L_t.
      scan: `nn.scan` over blocks (params `blocks` / `spatial` / `temporal` with a leading
        `layers` axis); same numbers as unrolled. remat: "none" | "full" | "dots_saveable" |
        "dots_with_no_batch_dims_saveable".

    Call:
      x: `(B, L, D)` tokens.
      grid: `(nt, nh, nw)` for a regular video, L = nt*nh*nw (joint ignores it, so extra tokens
        such as a CLS token are allowed there).
      segment_ids `(B, L)` int32 (0 = padding) and positions `(B, L, 3)` int (t, h, w): a packed
        NaViT sequence (give these instead of grid). Tokens attend only within their example;
        padding outputs are not meaningful.

    Raises:
      UserError: unknown attention / remat; factorised without grid or packing, or both; L not
        `prod(grid)`; segment_ids / positions of the wrong shape.

    Source: ViViT sec. 3.3 (models 1-3); the joint stack matches a stack of
      transformers `VivitLayer`s (tested).
    """

    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    attention: str = "joint"
    num_temporal_layers: int = 4
    scan: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _stack(self, block_cls, block_kw, depth, name, x, *args):
        return stack_blocks(block_cls, block_kw, depth, name, x, *args, scan=self.scan, remat=self.remat)

    @nn.compact
    def __call__(self, x: Array, *, grid: Grid | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None) -> Array:
        check(self.attention in ATTENTION_KINDS, "attention", self.attention, f"must be one of {ATTENTION_KINDS}")
        check(self.remat in REMAT_POLICIES, "remat", self.remat, f"must be one of {sorted(REMAT_POLICIES)}")
        check(x.ndim == 3, "x.shape", tuple(x.shape), "must be (B, L, D)")
        b, l, _ = x.shape
        packed = segment_ids is not None
        if packed:
            check(segment_ids.shape == (b, l), "segment_ids.shape", tuple(segment_ids.shape), f"must be (B, L)={(b, l)}")
        if self.attention != "joint":
            check(packed == (grid is None), "grid", grid, "give exactly one of grid or (segment_ids, positions)")
            if packed:
                check(positions is not None and positions.shape == (b, l, 3), "positions.shape",
                      None if positions is None else tuple(positions.shape), f"must be (B, L, 3)={(b, l, 3)}")
            else:
                check(len(grid) == 3 and math.prod(grid) == l, "grid", grid, f"must be (nt, nh, nw) with product L={l}")
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype)

        if self.attention == "joint":
            return self._stack(EncoderBlock, kw, self.num_layers, "blocks", x, segment_ids)

        if self.attention == "factorised_self_attention":
            if not packed:
                return self._stack(FactorisedSelfAttentionBlock, {**kw, "grid": tuple(grid)}, self.num_layers,
                                   "blocks", x)
            frame_ids = group_ids(segment_ids, positions[..., :1])
            location_ids = group_ids(segment_ids, positions[..., 1:])
            return self._stack(FactorisedSelfAttentionBlock, kw, self.num_layers, "blocks", x,
                               frame_ids, location_ids)

        # factorised_encoder (model 2)
        if not packed:
            nt = grid[0]
            frames = einops.rearrange(x, "b (t s) d -> (b t) s d", t=nt)
            frames = self._stack(EncoderBlock, kw, self.num_layers, "spatial", frames)
            frames = einops.rearrange(frames.astype(jnp.float32).mean(axis=1).astype(self.dtype),
                                      "(b t) d -> b t d", b=b)
            frames = self._stack(EncoderBlock, kw, self.num_temporal_layers, "temporal", frames)
            return jnp.repeat(frames, l // nt, axis=1)
        frame_ids = group_ids(segment_ids, positions[..., :1])
        x = self._stack(EncoderBlock, kw, self.num_layers, "spatial", x, frame_ids)
        x = _group_mean(x, frame_ids).astype(self.dtype)
        # Every token now holds its frame's mean; attending only to one representative token per
        # frame makes the temporal transformer see each frame once.
        is_rep = frame_ids == jnp.arange(1, l + 1, dtype=jnp.int32)[None]
        return self._stack(EncoderBlock, kw, self.num_temporal_layers, "temporal", x, segment_ids, is_rep)


# --------------------------------------------------------------------------- classifier


class ViViTClassifier(nn.Module):
    """Video classifier: TubeletEmbed + FactorisedPosEmbed -> ViViTEncoder -> pool -> LayerNorm -> Dense.

    Attributes:
      num_classes: output logits. patch_size: tubelet (pt, ph, pw). in_channels: C.
      hidden_size: D. num_layers, num_heads, mlp_dim, attention, num_temporal_layers, scan,
        remat: as `ViViTEncoder`.
      pos_embed: "learned" | "sincos" | "fractional" (`FactorisedPosEmbed`); max_grid: its
        (max_t, max_h, max_w) in tubelets.
      pool: "mean" over the example's tokens, or "cls" (a learned token prepended to the
        sequence; only with attention="joint" on a regular video, as in ViT / ViViT model 1).
      dtype / param_dtype: compute / storage dtype. Logits are float32.

    Call:
      x: a video `(B, T, H, W, C)` in [-1, 1] -> logits `(B, num_classes)`; or packed tubelets
        `(B, L, P)` with `segment_ids (B, L)`, `positions (B, L, 3)` and `num_segments` M
        (static; segments are numbered 1..M) -> logits `(B, M, num_classes)` (an empty segment
        gives the head's output for a zero vector). `example_shape (B, M, 3)` (the packer's grids)
        sets the fractional positions' grid sizes; without it they come from `segment_grid_sizes`.

    Raises:
      UserError: unknown attention / pos_embed / pool; cls with factorised attention or packed
        input; bad video shape or channels; a video grid larger than max_grid with learned
        positions; packed inputs of the wrong shapes or without num_segments.

    Source: ViViT sec. 3 (Arnab et al. 2021); head as ViT (Dosovitskiy et al. 2021), zero-initialised.
    """

    num_classes: int
    patch_size: Grid = (2, 16, 16)
    in_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    attention: str = "joint"
    num_temporal_layers: int = 4
    pos_embed: str = "learned"
    max_grid: Grid = (16, 14, 14)
    pool: str = "mean"
    scan: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, segment_ids: Array | None = None, positions: Array | None = None,
                 num_segments: int | None = None, example_shape: Array | None = None) -> Array:
        check(self.attention in ATTENTION_KINDS, "attention", self.attention, f"must be one of {ATTENTION_KINDS}")
        check(self.pos_embed in POS_EMBED_KINDS, "pos_embed", self.pos_embed, f"must be one of {POS_EMBED_KINDS}")
        check(self.pool in POOL_KINDS, "pool", self.pool, f"must be one of {POOL_KINDS}")
        packed = x.ndim == 3
        check(self.pool == "mean" or (self.attention == "joint" and not packed), "pool", self.pool,
              "'cls' needs attention='joint' and a video (not packed) input")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_size
        if packed:
            b, l = x.shape[:2]
            check(segment_ids is not None and segment_ids.shape == (b, l), "segment_ids.shape",
                  None if segment_ids is None else tuple(segment_ids.shape), f"must be (B, L)={(b, l)}")
            check(positions is not None and positions.shape == (b, l, 3), "positions.shape",
                  None if positions is None else tuple(positions.shape), f"must be (B, L, 3)={(b, l, 3)}")
            if num_segments is None and example_shape is not None:
                num_segments = example_shape.shape[1]
            check(isinstance(num_segments, int) and num_segments >= 1, "num_segments", num_segments,
                  "must be an int >= 1 for packed input")
            check(example_shape is None or example_shape.shape == (b, num_segments, 3), "example_shape.shape",
                  None if example_shape is None else tuple(example_shape.shape),
                  f"must be (B, num_segments, 3)={(b, num_segments, 3)}")
            grid_sizes = None
            if example_shape is not None:
                seg = jnp.clip(segment_ids - 1, 0, num_segments - 1)
                grid_sizes = jnp.maximum(jnp.take_along_axis(example_shape, seg[..., None], axis=1), 1)
        else:
            grid = _check_video(x, self.patch_size, self.in_channels)
            if self.pos_embed == "learned":
                check(all(g <= m for g, m in zip(grid, self.max_grid)), "tubelet grid", grid,
                      f"must fit max_grid={tuple(self.max_grid)} for learned position embeddings")
            positions = jnp.broadcast_to(grid_positions(grid)[None], (x.shape[0], math.prod(grid), 3))
            grid_sizes = jnp.asarray(grid)

        h, _ = TubeletEmbed(d, tuple(self.patch_size), self.in_channels, **kw, name="tubelet_embed")(x)
        h = h + FactorisedPosEmbed(d, *self.max_grid, kind=self.pos_embed, **kw, name="pos_embed")(
            positions, grid_sizes=grid_sizes, segment_ids=segment_ids)
        if self.pool == "cls":
            cls = self.param("cls", zeros((None, None, EMBED)), (1, 1, d), self.param_dtype)
            h = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (h.shape[0], 1, d)), h], axis=1)
        h = ViViTEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.attention, self.num_temporal_layers,
                         self.scan, self.remat, **kw, name="encoder")(
            h, grid=None if packed else grid, segment_ids=segment_ids, positions=positions if packed else None)

        h = h.astype(jnp.float32)
        if self.pool == "cls":
            pooled = h[:, 0]
        elif packed:
            onehot = (segment_ids[..., None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
            pooled = jnp.einsum("blm,bld->bmd", onehot, h) / jnp.maximum(onehot.sum(1), 1.0)[..., None]
        else:
            pooled = h.mean(axis=1)
        pooled = LayerNorm(epsilon=1e-6, **kw, name="norm")(pooled)
        logits = nn.Dense(self.num_classes, **kw, kernel_init=zeros((EMBED, None)),
                          bias_init=zeros((None,)), name="head")(pooled)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- variants

VARIANTS: dict[str, dict[str, Any]] = {
    # ViT widths / depths / heads (Dosovitskiy et al. 2021; Ti, S from DeiT), MLP 4 D,
    # tubelet 16x16x2 as ViViT-B/16x2; max_grid covers 32 frames at 224^2 (ViViT's Kinetics input).
    **{name: dict(hidden_size=d, num_layers=depth, num_heads=heads, mlp_dim=4 * d, patch_size=(2, 16, 16),
                  max_grid=(16, 14, 14), num_temporal_layers=4)
       for name, (depth, d, heads) in SIZES.items() if name in ("Ti", "S", "B")},
    # A few thousand parameters; 8 frames of 32^2 Moving MNIST -> a 4 x 4 x 4 tubelet grid.
    "smoke": dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, patch_size=(2, 8, 8), in_channels=1,
                  max_grid=(4, 4, 4), num_temporal_layers=1),
}


def Model(*, variant: str | None = None, **kw) -> ViViTClassifier:
    """A `ViViTClassifier` of a named variant ("Ti", "S", "B", "smoke"); kwargs override it.

    `num_classes` must be given (no variant fixes it).

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return ViViTClassifier(**{**(VARIANTS[variant] if variant else {}), **kw})
