"""MDT: the Masked Diffusion Transformer (Gao et al. 2023, "Masked Diffusion Transformer is a Strong
Image Synthesizer", arXiv:2303.14389), in the MDTv2 form of the official code (sail-sg/MDT,
`masked_diffusion/models.py: MDTv2`), built from the DiT's adaLN-Zero blocks (`dit.DiTBlock`).

  x (B, H, W, C) -> PatchEmbed + pos_embed (learnable, sin-cos initialised)   -> (B, L, D) "input_skip"
  [training, masked branch: keep a random (1 - mask_ratio) share of the tokens (`mae.random_masking`)]
  en_inblocks:  (depth - decode_layers) // 2 DiTBlocks, outputs pushed on a stack
  en_outblocks: as many DiTBlocks, each after Dense(concat(x, stack.pop()))   (U-ViT long skips)
  [masked branch: side-interpolator: mask tokens at the dropped places, + decoder_pos_embed,
   `side_layers` DiTBlocks, then the kept places take back their input ("masked shortcut")]
  [otherwise: + decoder_pos_embed]
  de_blocks: decode_layers DiTBlocks, each after Dense(concat(x, input_skip))
  FinalLayer -> unpatchify -> (B, H, W, C_out)

Training sums the diffusion loss of the full branch and of the masked branch (mask latent
modelling, `tasks.mdt`); sampling runs the full branch only (no side-interpolator). As in the
official code, the decoder's skip is the embedded input of all tokens, masked ones included.

Differs from the official MDTv2 in two ways, both stated in the config docs: the mask ratio is
fixed per run (static shapes under jit; MDTv2 draws it from U[mask_ratio, mask_ratio + 0.2] per
step), and attention has no relative position bias (the DiT's attention; positions enter through
the two learnable embeddings only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models.adaln import FinalLayer, cfg_drop, check_labels, embed_labels
from genjax.models.dit import DiTBlock
from genjax.models.layers import PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, unpatchify
from genjax.models.mae import random_masking

Dtype = Any
Array = jax.Array


class MDT(nn.Module):
    """Masked Diffusion Transformer (MDTv2): a DiT with U-ViT long skips and, in training, a
    side-interpolator that predicts the tokens the encoder did not see (module docstring).

    Attributes: as `dit.DiT` (patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
      num_classes with the null class at id num_classes, class_dropout_prob, learn_sigma,
      out_channels, frequency_embedding_size, attention_impl, dtype, param_dtype), and
      input_size: H = W of the inputs the learnable position embeddings are made for.
      decode_layers: decoder blocks (the official flags: 6 for S/2, 4 for XL/2); the encoder has
        depth - decode_layers blocks, half without and half with long skips. None: the largest
        count <= depth / 2 that leaves an even encoder (`num_decode_layers`).
      side_layers: side-interpolator blocks (1 in MDT).
      mask_ratio: share of tokens dropped in the masked branch (MDTv2 flag 0.3; fixed, see above).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    out_channels: int | None = None
    frequency_embedding_size: int = 256
    decode_layers: int | None = None
    side_layers: int = 1
    mask_ratio: float = 0.3
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_decode_layers(self) -> int:
        """decode_layers, or for None the largest d <= depth // 2 with depth - d even."""
        if self.decode_layers is not None:
            return self.decode_layers
        d = self.depth // 2
        return d - (self.depth - d) % 2

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels * (2 if self.learn_sigma else 1)

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool = False,
                 enable_mask: bool = False, force_drop_ids: Array | None = None) -> Array:
        """Denoiser output, as `dit.DiT.__call__`.

        Args:
          x: `(B, input_size, input_size, in_channels)` noisy input, float.
          t: `(B,)` or scalar timesteps in [0, 1000) (or flow time x 1000).
          y: `(B,)` int labels in [0, num_classes] (num_classes = null); None when num_classes = 0.
          train: label dropout with an rng named "dropout".
          enable_mask: the masked branch: drop mask_ratio of the tokens (rng named "mask") before
            the encoder and fill them in with the side-interpolator.
          force_drop_ids: `(B,)`; 1 -> null class (the unconditional half of CFG).

        Returns: `(B, H, W, C_out)` float32.

        Raises:
          UserError: x not `(B, input_size, input_size, in_channels)` or the side not divisible by
            patch_size; decode_layers not in [0, depth] or depth - decode_layers odd; t or y of the
            wrong shape or labels out of range; mask_ratio outside [0, 1).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p, s = self.hidden_size, self.patch_size, self.input_size
        check(x.ndim == 4 and x.shape[1:] == (s, s, self.in_channels), "x.shape", tuple(x.shape),
              f"must be (B, {s}, {s}, {self.in_channels}) (input_size, in_channels)")
        check(s % p == 0, "input_size", s, f"must be divisible by patch_size={p}")
        decode_layers = self.num_decode_layers
        enc = self.depth - decode_layers
        check(0 <= decode_layers <= self.depth and enc % 2 == 0, "decode_layers", decode_layers,
              f"must be in [0, depth={self.depth}] with depth - decode_layers even (two halves of long skips)")
        b, grid = x.shape[0], (s // p, s // p)
        check(jnp.shape(t) in ((), (b,)), "t.shape", jnp.shape(t), f"must be ({b},) or ()")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))

        def pos_init(_, shape, dtype=jnp.float32):
            return jnp.asarray(sincos_pos_embed_2d(d, *grid), dtype)[None]

        h = PatchEmbed(d, (p, p), **kw, name="x_embedder")(x).reshape(b, -1, d)
        h = h + self.param("pos_embed", pos_init, (1, grid[0] * grid[1], d), self.param_dtype).astype(self.dtype)
        c = TimestepEmbedder(d, self.frequency_embedding_size, **kw, name="t_embedder")(t)
        if self.num_classes:
            check(y is not None and jnp.shape(y) == (b,), "y.shape", None if y is None else jnp.shape(y), f"must be ({b},)")
            check_labels(y, self.num_classes, self.class_dropout_prob > 0)
            drop = cfg_drop(self, (b,), self.class_dropout_prob, train, force_drop_ids)
            c = c + embed_labels(y, drop, self.num_classes, self.class_dropout_prob > 0, d, **kw)
        c = c.astype(self.dtype)
        block_kw = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        attention_impl=self.attention_impl, **kw)

        def skip(name, a, bb):
            return nn.Dense(d, **kw, name=name)(jnp.concatenate([a, bb], axis=-1))

        side = [DiTBlock(**block_kw, name=f"sideblocks_{i}") for i in range(self.side_layers)]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d), self.param_dtype)
        input_skip = h
        if enable_mask:
            ids_keep, mask, ids_restore = random_masking(self.make_rng("mask"), b, h.shape[1], self.mask_ratio)
            h = jnp.take_along_axis(h, ids_keep[..., None], axis=1)
        skips = []
        for i in range(enc // 2):
            h = DiTBlock(**block_kw, name=f"en_inblocks_{i}")(h, c)
            skips.append(h)
        for i in range(enc // 2):
            h = DiTBlock(**block_kw, name=f"en_outblocks_{i}")(skip(f"en_outblocks_{i}_skip", h, skips.pop()), c)
        dec_pos = self.param("decoder_pos_embed", pos_init, (1, grid[0] * grid[1], d), self.param_dtype)
        if enable_mask:  # the side-interpolator (MDT Sec. 3.2)
            dropped = jnp.broadcast_to(mask_token.astype(h.dtype), (b, ids_restore.shape[1] - h.shape[1], d))
            h = jnp.take_along_axis(jnp.concatenate([h, dropped], axis=1), ids_restore[..., None], axis=1)
            h = h + dec_pos.astype(self.dtype)
            before = h
            for block in side:
                h = block(h, c)
            h = h * mask[..., None] + before * (1 - mask[..., None])  # the masked shortcut
        else:
            h = h + dec_pos.astype(self.dtype)
            if self.is_initializing():  # the side-interpolator's params exist for the masked branch
                for block in side:
                    block(h, c)
        for i in range(decode_layers):
            h = DiTBlock(**block_kw, name=f"de_blocks_{i}")(skip(f"de_blocks_{i}_skip", h, input_skip), c)
        out = FinalLayer(p * p * self.out_dim, **kw, name="final_layer")(h, c)
        return unpatchify(out, grid, (p, p)).astype(jnp.float32)


VARIANTS: dict[str, dict[str, Any]] = {
    # DiT-S/2 and XL/2 sizes with the decode_layer of the official README's training flags
    # (sail-sg/MDT: MDTv2_S_2 --decode_layer 6, MDTv2_XL_2 --decode_layer 4; --mask_ratio 0.30).
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, decode_layers=6),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, decode_layers=4),
}


def Model(*, variant: str | None = None, **kw) -> MDT:
    """An `MDT` of a named variant ("S/2", "XL/2"); kwargs override it.

    Raises: UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return MDT(**{**(VARIANTS[variant] if variant else {}), **kw})
