"""Spacetime tokens shared by ViViT, the video DiT and CLIP's video tower: tubelets, positions, groups.

Arnab et al. 2021, "ViViT: A Video Vision Transformer" (arXiv:2103.15691) sec. 3.2-3.4; Dehghani
et al. 2023, NaViT (packed sequences, factorised / fractional positions). Dimension letters are
defined in `genjax.models.layers`; `grid = (nt, nh, nw)` is the tubelet grid of a video.

  video (B, T, H, W, C) -> patchify_3d / TubeletEmbed / FramePatchEmbed -> tokens (B, nt*nh*nw, .)
  positions (B, L, 3) as (t, h, w) -> FactorisedPosEmbed -> (B, L, D)
  segment_ids + positions -> group_ids: the groups of factorised attention in packed sequences
  positions -> rope_angles -> apply_rope on attention queries and keys (3D RoPE)

Token order is (t, h, w) row-major and values inside a tubelet are ordered (pt, ph, pw, C), the
order of `genjax.data.packing`.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.layers import PatchEmbed, logical, sincos_embed, zeros
from genjax.parallel.axes import BATCH, CONV_IN, CONV_OUT, EMBED, LENGTH

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

POS_EMBED_KINDS = ("learned", "sincos", "fractional")
INFLATION_METHODS = ("central_frame", "filter_inflation")


# --------------------------------------------------------------------------- tubelets


def check_video(x: Array, patch_size: Grid, in_channels: int | None = None) -> Grid:
    """The tubelet grid `(T/pt, H/ph, W/pw)` of a video `(B, T, H, W, C)`.

    Raises:
      UserError: not 5-D, T, H, W not divisible by `patch_size`, or C != in_channels (when given).
    """
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
    grid = check_video(video, patch_size)
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
            check_video(x, self.patch_size, self.in_channels)
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
        grid = check_video(x, (1, *self.patch_size), self.in_channels)
        if self.num_frames is not None:
            x = uniform_frame_sampling(x, self.num_frames)
            grid = (self.num_frames, *grid[1:])
        b = x.shape[0]
        frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
        y = PatchEmbed(self.features, self.patch_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="patch_embed")(frames)
        return einops.rearrange(y, "(b t) s d -> b (t s) d", b=b), grid


# --------------------------------------------------------------------------- positions


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


def rope_angles(positions: Array, head_dim: int, theta: float = 10000.0) -> Array:
    """3D rotary position angles of tokens at `positions (B, L, 3)` int (t, h, w): `(B, L, K/2)` float32.

    The K/2 rotation frequencies of a head of width K are split over the three axes as Wan 2.1
    does (c = K/2: c - 2 (c // 3) for t, c // 3 for h, c // 3 for w); axis a with n frequencies
    uses theta^(-2i / 2n), i < n (RoFormer, Su et al. 2021, eq. 15, per axis). Positions are
    each token's own, so packed sequences and any grid size work (`apply_rope`).

    Raises:
      UserError: positions not (B, L, 3); K odd or below 6.
    """
    check(positions.ndim == 3 and positions.shape[-1] == 3, "positions.shape", tuple(positions.shape),
          "must be (B, L, 3) as (t, h, w)")
    check(head_dim % 2 == 0 and head_dim >= 6, "head_dim", head_dim, "must be even and >= 6 for 3D RoPE")
    c = head_dim // 2
    angles = []
    for axis, n in enumerate((c - 2 * (c // 3), c // 3, c // 3)):
        inv_freq = 1.0 / theta ** (np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n))
        angles.append(positions[..., axis:axis + 1].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32))
    return jnp.concatenate(angles, axis=-1)


def apply_rope(x: Array, angles: Array) -> Array:
    """Rotate each consecutive pair (x[2i], x[2i+1]) of `x (B, L, N, K)` by `angles (B, L, K/2)`
    (as complex numbers times e^{i angle}, Wan 2.1 `rope_apply`), in float32; x's dtype out."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    re = pairs[..., 0] * cos - pairs[..., 1] * sin
    im = pairs[..., 0] * sin + pairs[..., 1] * cos
    return jnp.stack([re, im], axis=-1).reshape(x.shape).astype(x.dtype)


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
        out = jnp.concatenate([sincos_embed(pos[..., i], w) for i, w in enumerate(sincos_split(self.features))], -1)
        return out.astype(self.dtype)


# --------------------------------------------------------------------------- packed groups


def group_ids(segment_ids: Array, keys: Array) -> Array:
    """Number the groups of tokens that share a segment and a key: `(B, L)` int32, 0 = padding.

    Token l's id is 1 + the index of the first token of its group, so ids are equal exactly
    within a group and a token is its group's representative iff `id == index + 1`. Found in
    O(L log L) by one lexicographic sort per row on (segment, keys, index): no `(L, L)` array.

    Args:
      segment_ids: `(B, L)` int, 0 = padding.
      keys: `(B, L, K)` int, e.g. `positions[..., :1]` (same frame) or `positions[..., 1:]`
        (same spatial location).

    Source: NaViT (Dehghani et al. 2023) sec. 2.2 masked attention, applied to ViViT's factorised
      attention (sec. 3.3 models 2-3).
    """
    l = segment_ids.shape[1]
    index = jnp.arange(l, dtype=jnp.int32)

    def one_row(seg, key):
        columns = (seg, *(key[:, i] for i in range(key.shape[-1])))
        order = jnp.lexsort((index, *columns[::-1]))  # by segment, then keys, then index
        sorted_cols = jnp.stack([c[order] for c in columns], -1)
        starts = jnp.concatenate([jnp.ones((1,), bool), jnp.any(sorted_cols[1:] != sorted_cols[:-1], -1)])
        start = jax.lax.cummax(jnp.where(starts, index, 0))  # sorted position of each group's first token
        return jnp.zeros(l, jnp.int32).at[order].set(order[start].astype(jnp.int32) + 1)

    first = jax.vmap(one_row)(segment_ids, keys)
    return jnp.where(segment_ids != 0, first, 0)
