"""Video DiT: a Sora-style diffusion transformer over spacetime patches, regular or NaViT-packed.

Sources: Brooks et al. 2024, "Video generation models as world simulators" (Sora technical report:
spacetime latent patches, variable resolution / duration / aspect, text conditioning); Lu et al.
2023, VDT (ViViT tubelets + DiT); Peebles & Xie 2023, DiT (adaLN-Zero, sec. 3.2); Arnab et al.
2021, ViViT (tubelets sec. 3.2, factorised self-attention model 3); Ma et al. 2024, Latte and
Open-Sora STDiT (spatial then temporal attention per block); Chen et al. 2023, PixArt-alpha
(text cross-attention after self-attention, before the MLP); Dehghani et al. 2023, NaViT
(patch n' pack). Dimension letters are defined in `genjax.models.layers`.

  x (B, T, H, W, C) latents -> TubeletEmbed (pt, ph, pw) + FactorisedPosEmbed (t, h, w) -> (B, L, D)
     (or pos_embed "rope": no added embedding; 3D RoPE on q, k in every self-attention)
     or packed tubelets (S, L, P) + segment_ids (S, L) + positions (S, L, 3)   (genjax.data.packing)
  c = TimestepEmbedder(t) [+ pooled text] [+ label]   per example, or per (example, frame)
  depth x VideoDiTBlock: adaLN-Zero self-attention ("joint" over all tokens of an example, or
     "factorised": spatial within a frame, then temporal at one (h, w)), x + cross-attention to
     the example's text tokens, adaLN-Zero MLP
  FinalLayer (adaLN, zero-initialised) -> (B, L, pt*ph*pw*C_out) -> unpatchify -> (B, T, H, W, C_out)

Packed sequences compile once per (S, L, M): examples of any (T, H, W) share the shape. Per-example
conditions are gathered per token through `segment_ids - 1`; self-attention is block-diagonal
over segments (`attention.Attention`, padding neither attends nor is attended), and cross-attention
of segment j sees only example j's text tokens. A packed forward equals each example run alone
through the regular path (tested to 1e-5).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.adaln import (FinalLayer, adaln_norm, cfg_drop, check_text, embed_labels, embed_text,
                                 modulations)
from genjax.models.attention import Attention, factorised_attention
from genjax.models.layers import REMAT_POLICIES, SIZES, Mlp, TimestepEmbedder, stack_blocks
from genjax.models.spacetime import (POS_EMBED_KINDS, FactorisedPosEmbed, TubeletEmbed, grid_positions, group_ids,
                                     rope_angles, unpatchify_3d)
from genjax.parallel.axes import BATCH, LENGTH

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

ATTENTION_KINDS = ("joint", "factorised")
VIDEO_POS_EMBEDS = (*POS_EMBED_KINDS, "rope")


class VideoDiTBlock(nn.Module):
    """adaLN-Zero block over spacetime tokens with per-token conditions: `(B, L, D)` -> `(B, L, D)`.

    attention "joint": `attn` over all tokens (of the same segment when packed), then MLP, with
    DiT's 6 modulations (shift/scale/gate for attention and MLP). "factorised": `attn_spatial`
    (tokens of one frame), `attn_temporal` (tokens at one (h, w)), MLP, with 9 modulations
    (spatial, temporal, MLP) — ViViT model 3 with adaLN-Zero, as Latte / Open-Sora STDiT. With
    `cross_attention`, `x + cross_attn(x, context)` comes after self-attention and before the MLP
    (PixArt-alpha). `adaLN_modulation` and `cross_attn.to_out` are zero-initialised, so a fresh
    block is the identity.

    Regular grids (`grid` = (nt, nh, nw) set, L = nt*nh*nw) run factorised attention by reshaping;
    packed sequences (grid None) use `frame_ids` / `location_ids` from `spacetime.group_ids` as
    attention segments. Call positional args (for `nn.scan`): `x, c (B, G, D), c_index (B, L) | None,
    segment_ids, frame_ids, location_ids, context (B, S, D), context_mask (B, S),
    context_segment_ids (B, S), rope (B, L, K/2)` (unused ones None; see `adaln.per_token` for c /
    c_index; rope: 3D rotary angles of the tokens, `spacetime.rope_angles`).
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    attention: str = "joint"
    grid: Grid | None = None
    cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, c_index, segment_ids, frame_ids, location_ids, context, context_mask,
                 context_segment_ids, rope):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attns = [("attn", None, segment_ids)] if self.attention == "joint" else [
            ("attn_spatial", "spatial", frame_ids), ("attn_temporal", "temporal", location_ids)]
        mods = modulations(c, 3 * (len(attns) + 1), self.hidden_size, c_index, **kw)
        for i, (name, axis, ids) in enumerate(attns):
            shift, scale, gate = mods[3 * i: 3 * i + 3]
            h = adaln_norm(x, shift, scale, dtype=self.dtype, name=f"norm_{name}")
            attn = Attention(self.num_heads, attention_impl=self.attention_impl, **kw, name=name)
            if axis is None:
                h = attn(h, segment_ids=ids, rope=rope)
            else:
                h = factorised_attention(attn, h, axis, grid=self.grid, group_ids=None if self.grid else ids, rope=rope)
            x = x + (gate * h).astype(self.dtype)
        if self.cross_attention:
            x = x + Attention(self.num_heads, zero_init_out=True, attention_impl=self.attention_impl, **kw,
                              name="cross_attn")(
                x, context, segment_ids=segment_ids, context_segment_ids=context_segment_ids, context_mask=context_mask)
        shift, scale, gate = mods[-3:]
        h = adaln_norm(x, shift, scale, dtype=self.dtype, name="norm_mlp")
        h = Mlp(int(self.hidden_size * self.mlp_ratio), **kw, name="mlp")(h)
        x = x + (gate * h).astype(self.dtype)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class VideoDiT(nn.Module):
    """Sora-style video diffusion transformer on latents, regular `(B, T, H, W, C)` or packed.

    Attributes:
      patch_size: tubelet (pt, ph, pw); pt = 1 lets images (T = 1) and videos train together.
      in_channels: C of the latents. hidden_size: D. depth: blocks. num_heads: N. mlp_ratio.
      attention: "joint" (full spacetime attention, Sora / VDT) | "factorised" (spatial then
        temporal in each block, ViViT model 3 / Latte / Open-Sora STDiT).
      pos_embed: "sincos" (fixed, any grid) | "learned" | "fractional" (`spacetime.FactorisedPosEmbed`,
        added to the tokens) | "rope" (3D rotary embedding of queries and keys in every
        self-attention, head dim split over (t, h, w) as Wan 2.1, `spacetime.rope_angles`; relative,
        so any grid and longer or larger samples than in training); max_grid: (max_t, max_h,
        max_w) in tubelets (used by "learned" / "fractional").
      num_classes: class labels (0 = none; id num_classes = null class when class_dropout_prob > 0).
      class_dropout_prob / text_dropout_prob: CFG dropout probabilities in training.
      context_dim: Dc, the width of the text-encoder tokens, or None for no text (`adaln.TextEmbedder`).
      learn_sigma: output 2C channels [eps, v]; out_channels overrides C_out.
      frequency_embedding_size: timestep sinusoid width.
      scan / remat / attention_impl: as `dit.DiT` (scanned params `blocks` with a leading `layers`
        axis; "blockwise" keeps memory linear in the sequence length, packed and factorised too).
      dtype / param_dtype: compute / storage dtype (norms, softmax, timestep sinusoids in float32).

    Call forms (params from `init` on the regular form serve both):
      `module.apply(params, x, t, y=None, *, text, text_mask, text_pooled, train, force_drop_ids)`
      `module.apply(params, tokens, segment_ids, positions, t, ..., method="packed")` (or
        `apply_packed(module, params, batch, t, ...)` with a `genjax.data.packing` dict).
    """

    patch_size: Grid = (1, 2, 2)
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    attention: str = "factorised"
    pos_embed: str = "sincos"
    max_grid: Grid = (16, 32, 32)
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    context_dim: int | None = None
    text_dropout_prob: float = 0.1
    learn_sigma: bool = False
    out_channels: int | None = None
    frequency_embedding_size: int = 256
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        """C_out: `out_channels` or C * (2 if learn_sigma else 1)."""
        return self.out_channels or self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def patch_values(self) -> int:
        """P = pt * ph * pw * C of an input tubelet."""
        return int(np.prod(self.patch_size)) * self.in_channels

    def _check_common(self, lead, y, text, text_mask, text_pooled, force_drop_ids):
        for field in ("depth", "hidden_size", "num_heads"):
            check(getattr(self, field) >= 1, field, getattr(self, field), "must be >= 1")
        check(self.attention in ATTENTION_KINDS, "attention", self.attention, f"must be one of {ATTENTION_KINDS}")
        check(self.pos_embed in VIDEO_POS_EMBEDS, "pos_embed", self.pos_embed, f"must be one of {VIDEO_POS_EMBEDS}")
        check(self.remat in REMAT_POLICIES, "remat", self.remat, f"must be one of {sorted(REMAT_POLICIES)}")
        if self.num_classes:
            check(y is not None and jnp.shape(y) == lead, "y.shape", None if y is None else jnp.shape(y),
                  f"must be {lead}")
        else:
            check(y is None, "y", "given", "needs num_classes > 0")
        check_text(text, text_mask, text_pooled, lead, self.context_dim)
        if force_drop_ids is not None:
            check(jnp.shape(force_drop_ids) == lead, "force_drop_ids.shape", jnp.shape(force_drop_ids),
                  f"must be {lead}")
            check((self.num_classes and self.class_dropout_prob > 0) or (self.context_dim and not self.num_classes),
                  "force_drop_ids", "given", "needs a null class (class_dropout_prob > 0) or text-only conditioning")

    def __call__(self, x: Array, t: Array, y: Array | None = None, *, text: Array | None = None,
                 text_mask: Array | None = None, text_pooled: Array | None = None, train: bool = False,
                 force_drop_ids: Array | None = None) -> Array:
        """Denoiser output for noisy video latents (regular form).

        Args:
          x: `(B, T, H, W, C)` float latents (an image is T = 1); T, H, W divisible by patch_size.
          t: `()` / `(B,)` timesteps, or `(B, T)` one per frame (frame conditioning: known frames
            t = 0); int or float in [0, 1000). With pt > 1 a tubelet takes its first frame's t.
          y: `(B,)` int labels (num_classes > 0), id num_classes = null class.
          text: `(B, S, context_dim)` text-encoder tokens (required iff context_dim is set).
          text_mask: `(B, S)` bool/int, 1 = real token; masked tokens never influence the output.
          text_pooled: optional `(B, context_dim)` (default: masked mean of text).
          train: CFG dropout of labels / text when an rng named "dropout" is given.
          force_drop_ids: `(B,)`; 1 -> null label and null text (unconditional CFG branch).

        Returns:
          `(B, T, H, W, C_out)` float32 (with learn_sigma: first C channels eps, last C v).

        Raises:
          UserError (before compiling): x not 5-D, wrong channels, T/H/W not divisible by the
            tubelet, t / y / text / text_mask / force_drop_ids of wrong shapes or missing, unknown
            attention / pos_embed / remat, a grid beyond max_grid with learned positions.
        """
        check(x.ndim == 5, "x.shape", tuple(x.shape), "must be (B, T, H, W, C)")
        b, n_frames = x.shape[:2]
        check(x.shape[-1] == self.in_channels, "x.shape[-1]", x.shape[-1], f"must equal in_channels={self.in_channels}")
        check(all(s % p == 0 for s, p in zip(x.shape[1:4], self.patch_size)), "x (T, H, W)", tuple(x.shape[1:4]),
              f"must be divisible by the tubelet patch_size={tuple(self.patch_size)}")
        t = jnp.asarray(t)
        check(t.shape in ((), (b,), (b, n_frames)), "t.shape", t.shape, f"must be (), (B,)=({b},) or (B, T)={(b, n_frames)}")
        self._check_common((b,), y, text, text_mask, text_pooled, force_drop_ids)
        grid = tuple(s // p for s, p in zip(x.shape[1:4], self.patch_size))
        if self.pos_embed == "learned":
            check(all(g <= m for g, m in zip(grid, self.max_grid)), "tubelet grid", grid,
                  f"must fit max_grid={tuple(self.max_grid)} for learned position embeddings")
        positions = jnp.broadcast_to(jnp.asarray(grid_positions(grid))[None], (b, int(np.prod(grid)), 3))
        if t.ndim == 2:  # per frame -> per tubelet frame; condition row = the token's frame
            t_rows, c_index = t[:, :: self.patch_size[0]], positions[..., 0]
        else:
            t_rows, c_index = jnp.broadcast_to(t, (b,))[:, None], None
        expand = (lambda a: None if a is None else jnp.asarray(a)[:, None])
        out = self._forward(x, positions, None, grid, 1, t_rows, c_index, expand(y), expand(text), expand(text_mask),
                            expand(text_pooled), expand(force_drop_ids), jnp.asarray(grid), train)
        return unpatchify_3d(out, grid, tuple(self.patch_size))

    def packed(self, tokens: Array, segment_ids: Array, positions: Array, t: Array, y: Array | None = None, *,
               text: Array | None = None, text_mask: Array | None = None, text_pooled: Array | None = None,
               example_shape: Array | None = None, train: bool = False,
               force_drop_ids: Array | None = None) -> Array:
        """Denoiser output for NaViT-packed spacetime patches (`genjax.data.packing` layout).

        S sequences of L tokens hold up to M examples each (segment j + 1 = example slot j).

        Args:
          tokens: `(S, L, P)` noisy latent tubelets, P = pt*ph*pw*C in (pt, ph, pw, C) order.
          segment_ids: `(S, L)` int, 0 = padding, j + 1 = slot j. positions: `(S, L, 3)` (t, h, w).
          t: `(S, M)` timestep per example, or `(S, M, F)` per example and tubelet frame (token
            frame positions[..., 0] < F); empty slots are ignored.
          y: `(S, M)` labels. text: `(S, M, S_text, context_dim)`; text_mask: `(S, M, S_text)`;
            text_pooled: `(S, M, context_dim)`; force_drop_ids: `(S, M)` — as the regular form, per slot.
          example_shape: `(S, M, 3)` the packer's tubelet grids (for pos_embed="fractional").
          train: CFG dropout (per example) with an rng named "dropout".

        Returns:
          `(S, L, pt*ph*pw*C_out)` float32 in the tokens' layout, 0 at padding; undo with
          `genjax.data.packing.unpack({**batch, "tokens": out})`.

        Raises:
          UserError (before compiling): shapes inconsistent with the above, P != pt*ph*pw*C,
            unknown attention / pos_embed / remat.
        """
        check(tokens.ndim == 3 and tokens.shape[-1] == self.patch_values, "tokens.shape", tuple(tokens.shape),
              f"must be (S, L, P={self.patch_values}) for patch_size={tuple(self.patch_size)}, "
              f"in_channels={self.in_channels}")
        s, l = tokens.shape[:2]
        check(jnp.shape(segment_ids) == (s, l), "segment_ids.shape", jnp.shape(segment_ids), f"must be {(s, l)}")
        check(jnp.shape(positions) == (s, l, 3), "positions.shape", jnp.shape(positions), f"must be {(s, l, 3)}")
        t = jnp.asarray(t)
        check(t.ndim in (2, 3) and t.shape[0] == s, "t.shape", t.shape, f"must be (S, M) or (S, M, F) with S={s}")
        m = t.shape[1]
        self._check_common((s, m), y, text, text_mask, text_pooled, force_drop_ids)
        check(example_shape is None or jnp.shape(example_shape) == (s, m, 3), "example_shape.shape",
              jnp.shape(example_shape), f"must be {(s, m, 3)}")
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        slot = jnp.clip(segment_ids - 1, 0, m - 1)
        if t.ndim == 3:
            n_f = t.shape[2]
            t_rows, c_index = t.reshape(s, m * n_f), slot * n_f + jnp.clip(positions[..., 0], 0, n_f - 1)
        else:
            t_rows, c_index = t, slot
        grid_sizes = None
        if example_shape is not None:
            grid_sizes = jnp.maximum(jnp.take_along_axis(jnp.asarray(example_shape), slot[..., None], axis=1), 1)
        out = self._forward(tokens, positions, segment_ids, None, m, t_rows, c_index, y, text, text_mask, text_pooled,
                            force_drop_ids, grid_sizes, train)
        return jnp.where((segment_ids > 0)[..., None], out, 0.0)

    @nn.compact
    def _forward(self, x, positions, segment_ids, grid, m, t_rows, c_index, y, text, text_mask, text_pooled,
                 force_drop_ids, grid_sizes, train):
        """Shared body. Per-example fields have a leading `(B, M)` (M = 1 in the regular form);
        t_rows `(B, G)` are condition rows ordered (example, frame), `c_index (B, L)` each token's
        row (None: G = 1)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, b = self.hidden_size, t_rows.shape[0]
        packed = segment_ids is not None
        h, _ = TubeletEmbed(d, tuple(self.patch_size), self.in_channels, **kw, name="x_embedder")(x)
        rope = None
        if self.pos_embed == "rope":
            rope = rope_angles(positions, d // self.num_heads)
        else:
            h = h + FactorisedPosEmbed(d, *self.max_grid, kind=self.pos_embed, **kw, name="pos_embed")(
                positions, grid_sizes=grid_sizes, segment_ids=segment_ids)

        c = TimestepEmbedder(d, self.frequency_embedding_size, **kw, name="t_embedder")(
            t_rows.reshape(-1)).reshape(*t_rows.shape, d)
        extra = jnp.zeros((b, m, d), self.dtype)  # per-example conditions, added to every row of the example
        if self.num_classes:
            drop = cfg_drop(self, (b, m), self.class_dropout_prob, train, force_drop_ids)
            extra = extra + embed_labels(y, drop, self.num_classes, self.class_dropout_prob > 0, d, **kw)
        context = context_mask = context_segment_ids = None
        if self.context_dim:
            context, context_mask, context_segment_ids, pooled = embed_text(
                self, text, text_mask, text_pooled, force_drop_ids, train=train, packed=packed, **kw)
            extra = extra + pooled
        # condition rows are ordered (example, frame): row r belongs to example r // (G / M)
        c = (c.reshape(b, m, -1, d) + extra[:, :, None]).reshape(b, -1, d).astype(self.dtype)

        frame_ids = location_ids = None
        if packed and self.attention == "factorised":
            frame_ids = group_ids(segment_ids, positions[..., :1])
            location_ids = group_ids(segment_ids, positions[..., 1:])
        block_kw = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, attention=self.attention,
                        grid=grid, cross_attention=bool(self.context_dim), attention_impl=self.attention_impl, **kw)
        args = (c, c_index, segment_ids, frame_ids, location_ids, context, context_mask, context_segment_ids, rope)
        h = stack_blocks(VideoDiTBlock, block_kw, self.depth, "blocks", h, *args, scan=self.scan, remat=self.remat)
        return FinalLayer(int(np.prod(self.patch_size)) * self.out_dim, **kw, name="final_layer")(h, c, c_index)


def apply_packed(module: VideoDiT, params, batch: Mapping[str, Any], t: Array, **kw) -> Array:
    """`module.packed` on a `genjax.data.packing` batch dict (`tokens`, `segment_ids`, `positions`,
    `example_shape`); `t (S, M)` / `(S, M, F)` and `**kw` (y, text, text_mask, ...) as `VideoDiT.packed`.
    Returns `(S, L, pt*ph*pw*C_out)` float32; `packing.unpack({**batch, "tokens": out})` gives videos."""
    return module.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"], t,
                        example_shape=batch.get("example_shape"), method="packed", **kw)


# --------------------------------------------------------------------------- variants

VARIANTS: dict[str, dict[str, Any]] = {
    # DiT widths / depths (Peebles & Xie 2023, Table 1) on 4-channel latents with (1, 2, 2) tubelets,
    # factorised attention and 4096-wide T5 text tokens, as Open-Sora STDiT-XL/2.
    **{f"{name}/2": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=(1, 2, 2), in_channels=4,
                         attention="factorised", context_dim=4096, learn_sigma=True)
       for name, (depth, width, heads) in SIZES.items() if name in ("S", "B", "L", "XL")},
    # Moving MNIST on CPU: 1-channel 64x64 frames, 4x4 patches -> 16x16 tokens per frame.
    "tiny": dict(depth=2, hidden_size=64, num_heads=4, patch_size=(1, 4, 4), in_channels=1, attention="factorised",
                 max_grid=(32, 16, 16)),
}


def Model(*, variant: str | None = None, **kw) -> VideoDiT:
    """A `VideoDiT` of a named variant ("tiny", "S/2", "B/2", "L/2", "XL/2"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return VideoDiT(**{**(VARIANTS[variant] if variant else {}), **kw})
