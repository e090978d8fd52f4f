"""ViViT: joint / factorised space-time transformer encoders and a video classifier.

Arnab et al. 2021, "ViViT: A Video Vision Transformer" (arXiv:2103.15691). Dimension letters are
defined in `genjax.models.layers`; `grid = (nt, nh, nw)` is the tubelet grid of a video. Tubelets,
positions and packed groups are in `genjax.models.spacetime`.

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

from genjax.errors import check
from genjax.models.attention import Attention, factorised_attention
from genjax.models.layers import REMAT_POLICIES, SIZES, LayerNorm, Mlp, stack_blocks, zeros
from genjax.models.spacetime import (POS_EMBED_KINDS, FactorisedPosEmbed, TubeletEmbed, check_video, grid_positions,
                                     group_ids)
from genjax.parallel.axes import BATCH, EMBED, LENGTH

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

ATTENTION_KINDS = ("joint", "factorised_encoder", "factorised_self_attention")
POOL_KINDS = ("mean", "cls")


# --------------------------------------------------------------------------- packed groups


def _group_mean(x: Array, ids: Array) -> Array:
    """Each token replaced by the mean of its group (`ids` from `group_ids`, 0 = padding -> 0), in
    float32, by segment sums over (row, id): O(L), no `(L, L)` array."""
    b, l = ids.shape
    flat = (jnp.arange(b)[:, None] * (l + 1) + ids).reshape(-1)
    total = jax.ops.segment_sum(x.reshape(b * l, -1).astype(jnp.float32), flat, num_segments=b * (l + 1))
    count = jax.ops.segment_sum(jnp.ones(b * l, jnp.float32), flat, num_segments=b * (l + 1))
    mean = (total / jnp.maximum(count, 1.0)[:, None])[flat].reshape(x.shape)
    return jnp.where((ids != 0)[..., None], mean, 0.0)


# --------------------------------------------------------------------------- blocks


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MSA(LN(x)), then + MLP(LN(.)): `(B, L, D)` -> `(B, L, D)`.

    Submodules `norm1`, `attn` (`attention.Attention`), `norm2`, `mlp` (`layers.Mlp`, GELU tanh
    approximation as flax / Scenic ViViT). LayerNorm eps 1e-6, float32.
    Call `(x, segment_ids=None, kv_mask=None)`: `segment_ids (B, L)` restricts attention to equal
    nonzero ids; `kv_mask (B, L)` bool, False = key not attended. `causal`: token l attends to
    tokens <= l only (a decoder-only block, as DALL·E's transformer; `Attention(causal=True)`).

    Source: ViT (Dosovitskiy et al. 2021) eqs. 2-3; ViViT eqs. 4-5; matches transformers
      `VivitLayer` (tested).
    """

    num_heads: int
    mlp_dim: int
    attention_impl: str = "auto"
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None = None, kv_mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(epsilon=1e-6, **kw, name="norm1")(x)
        x = x + Attention(self.num_heads, attention_impl=self.attention_impl, **kw, name="attn")(
            h, segment_ids=segment_ids, context_mask=kv_mask, causal=self.causal)
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
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, frame_ids: Array | None = None, location_ids: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for axis, ids in (("spatial", frame_ids), ("temporal", location_ids)):
            h = LayerNorm(epsilon=1e-6, **kw, name=f"norm_{axis}")(x)
            attn = Attention(self.num_heads, attention_impl=self.attention_impl, **kw, name=f"attn_{axis}")
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
        "dots_with_no_batch_dims_saveable". attention_impl: `attention.dot_product_attention`'s
        implementation ("auto", "xla", "blockwise", "cudnn", "pallas").

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
    attention_impl: str = "auto"
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
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)

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
        remat, attention_impl: as `ViViTEncoder`.
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
    attention_impl: str = "auto"
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
            grid = check_video(x, self.patch_size, self.in_channels)
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
                         self.scan, self.remat, attention_impl=self.attention_impl, **kw, name="encoder")(
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
