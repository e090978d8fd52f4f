"""CLIP's encoders ("towers"): the pre-LN transformer and the text, image and video towers.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
sec. 2.4. Dimension letters are defined in `genjax.models.layers`. `genjax.models.clip.CLIP`
projects the pooled outputs to a shared embedding; `clip.load_transformers` reads the text and
image towers from transformers checkpoints.

  ids (B, L) int32 + mask (B, L) bool -> TextTransformer  -> (hidden (B, L, D), pooled at EOT (B, D))
  images (B, H, W, C) in [-1, 1]      -> VisionTransformer -> (hidden (B, 1+L, D), pooled CLS (B, D))
  videos (B, T, H, W, C) in [-1, 1]   -> VideoTransformer  -> (hidden (B, L, D), mean-pooled (B, D))

The text and image towers match transformers' `CLIPTextModel` / `CLIPVisionModel` exactly
(tested to 1e-4); both are a `Transformer` of `ResidualAttentionBlock`s with an activation from
`ACTIVATIONS`. The video tower is ViViT's tubelet embedding + encoder (`genjax.models.vivit`),
mean-pooled.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.attention import Attention
from genjax.models.layers import LayerNorm, Mlp, PatchEmbed, logical, stack_blocks
from genjax.models.spacetime import FactorisedPosEmbed, TubeletEmbed, grid_positions
from genjax.models.vivit import ATTENTION_KINDS, ViViTEncoder
from genjax.parallel.axes import BATCH, EMBED, LENGTH, VOCAB

Dtype = Any
Array = jax.Array


def quick_gelu(x: Array) -> Array:
    """`x * sigmoid(1.702 x)`, OpenAI CLIP's GELU approximation (transformers "quick_gelu")."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,  # OpenAI CLIP
    "gelu": functools.partial(nn.gelu, approximate=False),  # OpenCLIP (e.g. SD 2 text encoder)
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
}


# --------------------------------------------------------------------------- transformer


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MSA(LN(x)), then + MLP(LN(.)): `(B, L, D)` -> `(B, L, D)` in `dtype`.

    Submodules `layer_norm1`, `self_attn` (`attention.Attention`), `layer_norm2`, `mlp`
    (`layers.Mlp`); `kv_mask (B, L)` bool (False = key never attended), `causal` (query l sees
    keys <= l). Source: OpenAI CLIP `ResidualAttentionBlock`; transformers `CLIPEncoderLayer`.
    """

    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.layer_norm_eps, **kw, name="layer_norm1")(x)
        x = x + Attention(self.num_heads, attention_impl=self.attention_impl, **kw, name="self_attn")(
            h, context_mask=kv_mask, causal=self.causal)
        h = LayerNorm(self.layer_norm_eps, **kw, name="layer_norm2")(x)
        x = x + Mlp(self.mlp_dim, activation=ACTIVATIONS[self.activation], **kw, name="mlp")(h)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class Transformer(nn.Module):
    """A stack of `ResidualAttentionBlock`s: `(B, L, D)` -> `(B, L, D)`.

    Blocks `layers_i`, or with `scan=True` one `layers` whose params have a leading `layers`
    axis (same numbers). `remat`: "none" | "full" | "dots_saveable" |
    "dots_with_no_batch_dims_saveable". Call `(x, kv_mask=None)`.

    Raises:
      UserError: unknown activation or remat policy.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array | None = None) -> Array:
        check(self.activation in ACTIVATIONS, "activation", self.activation, f"must be one of {list(ACTIVATIONS)}")
        block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                        layer_norm_eps=self.layer_norm_eps, causal=self.causal, attention_impl=self.attention_impl,
                        dtype=self.dtype,
                        param_dtype=self.param_dtype)
        return stack_blocks(ResidualAttentionBlock, block_kw, self.num_layers, "layers", x, kv_mask,
                            scan=self.scan, remat=self.remat)


# --------------------------------------------------------------------------- towers


class TextTransformer(nn.Module):
    """CLIP text tower: token + learned position embeddings, causal pre-LN transformer, final LN,
    pooled at the end-of-text token.

    Call `(ids, mask=None)`:
      ids: `(B, L)` int token ids, L <= context_length (a `genjax.models.tokenizer` output).
      mask: `(B, L)` bool, False = padding. Padding keys are never attended, so padding tokens
        (their ids or positions) never change the pooled output or the hidden states of real
        tokens; the hidden states at padding positions themselves are not meaningful (use the mask
        when cross-attending to them).

    Returns:
      `(last_hidden_state (B, L, D), pooled (B, D))` in `dtype`. pooled = the hidden state at
      `argmax(ids)` when `eos_token_id` is None (OpenAI CLIP, whose EOT is the largest id; also
      `genjax.models.tokenizer.ByteTokenizer`), else at the first position holding
      `eos_token_id` (position 0 if there is none).

    Params: `token_embedding.embedding (vocab, D)`, `position_embedding (context_length, D)`,
    `transformer`, `final_layer_norm`.

    Raises:
      UserError: ids not 2-D, L > context_length, mask of another shape, bad activation / remat.

    Source: Radford et al. 2021 sec. 2.4 (GPT-2-style text transformer, EOT features); matches
      transformers 5.x `CLIPTextModel` (last_hidden_state and pooler_output, tested to 1e-4;
      transformers' `eos_token_id == 2` legacy case is our `eos_token_id=None`).
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
        check(ids.ndim == 2, "ids.shape", tuple(ids.shape), "must be (B, L)")
        b, l = ids.shape
        check(l <= self.context_length, "ids.shape[1]", l, f"must be <= context_length={self.context_length}")
        check(mask is None or tuple(mask.shape) == (b, l), "mask.shape", None if mask is None else tuple(mask.shape),
              f"must equal ids.shape={(b, l)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(self.vocab_size, self.width, **kw, name="token_embedding",
                       embedding_init=logical(nn.initializers.normal(0.02), (VOCAB, EMBED)))(ids)
        pos = self.param("position_embedding", logical(nn.initializers.normal(0.01), (None, EMBED)),
                         (self.context_length, self.width), self.param_dtype)
        h = tok + jnp.asarray(pos[:l], self.dtype)[None]
        h = Transformer(self.num_layers, self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                        causal=True, scan=self.scan, remat=self.remat, attention_impl=self.attention_impl, **kw,
                        name="transformer")(
            h, None if mask is None else mask.astype(bool))
        h = LayerNorm(self.layer_norm_eps, **kw, name="final_layer_norm")(h)
        eot = jnp.argmax(ids if self.eos_token_id is None else (ids == self.eos_token_id).astype(jnp.int32), -1)
        return h, h[jnp.arange(b), eot]


def pair(x) -> tuple[int, int]:
    """An int `n` -> `(n, n)`; a pair of ints -> a tuple of two ints (image and patch sizes)."""
    return (int(x), int(x)) if isinstance(x, (int, np.integer)) else tuple(int(v) for v in x)


class VisionTransformer(nn.Module):
    """CLIP image tower (ViT): patch embedding (no bias), class token, learned positions,
    pre-LN ("pre_layrnorm"), transformer, CLS pooling through a final LayerNorm.

    Call `(x)`: images `(B, H, W, C)` float in [-1, 1] (or whatever normalisation the weights
    were trained with; OpenAI CLIP uses per-channel mean/std), `(H, W) == image_size`.

    Returns:
      `(last_hidden_state (B, 1 + (H/ph)*(W/pw), D), pooled (B, D))` in `dtype`; token 0 is CLS,
      pooled = `post_layernorm(last_hidden_state[:, 0])`.

    Raises:
      UserError: not 4-D, (H, W) != image_size, C != in_channels, image_size not divisible by
        patch_size.

    Source: Dosovitskiy et al. 2021 (ViT) with CLIP's extra pre-LN (Radford et al. 2021 sec. 2.4);
      matches transformers `CLIPVisionModel` (tested to 1e-4).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (32, 32)
    in_channels: int = 3
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        (hh, ww), (ph, pw) = pair(self.image_size), pair(self.patch_size)
        check(hh % ph == 0 and ww % pw == 0, "image_size", (hh, ww), f"must be divisible by patch_size={(ph, pw)}")
        check(x.ndim == 4 and tuple(x.shape[1:]) == (hh, ww, self.in_channels), "images.shape", tuple(x.shape),
              f"must be (B, {hh}, {ww}, {self.in_channels})")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, n = self.width, (hh // ph) * (ww // pw)
        h = PatchEmbed(d, (ph, pw), use_bias=False, **kw, name="patch_embed")(x)
        cls = self.param("class_embedding", logical(nn.initializers.normal(d ** -0.5), (EMBED,)), (d,),
                         self.param_dtype)
        pos = self.param("position_embedding", logical(nn.initializers.normal(d ** -0.5), (None, EMBED)),
                         (n + 1, d), self.param_dtype)
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (x.shape[0], 1, d))
        h = jnp.concatenate([cls, h], axis=1) + jnp.asarray(pos, self.dtype)[None]
        h = LayerNorm(self.layer_norm_eps, **kw, name="pre_layernorm")(h)
        h = Transformer(self.num_layers, self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                        scan=self.scan, remat=self.remat, attention_impl=self.attention_impl, **kw,
                        name="transformer")(h)
        return h, LayerNorm(self.layer_norm_eps, **kw, name="post_layernorm")(h[:, 0])


class VideoTransformer(nn.Module):
    """Video tower: ViViT tubelet embedding + learned factorised (t, h, w) positions + ViViT
    encoder, mean-pooled over tokens through a LayerNorm.

    Call `(x)`: videos `(B, T, H, W, C)` float in [-1, 1]; the tubelet grid `(T/pt, H/ph, W/pw)`
    must fit `max_grid`.

    Returns:
      `(tokens (B, nt*nh*nw, D), pooled (B, D))` in `dtype`.

    Raises:
      UserError: not 5-D, T/H/W not divisible by the tubelet, wrong channels, grid larger than
        max_grid, unknown attention.

    Source: ViViT (Arnab et al. 2021) sec. 3 (`genjax.models.vivit`), pooled as a CLIP tower.
    """

    patch_size: tuple[int, int, int] = (2, 16, 16)
    in_channels: int = 3
    max_grid: tuple[int, int, int] = (8, 14, 14)
    width: int = 768
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

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        check(self.attention in ATTENTION_KINDS, "attention", self.attention, f"must be one of {ATTENTION_KINDS}")
        check(x.ndim == 5, "videos.shape", tuple(x.shape), "must be (B, T, H, W, C)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, grid = TubeletEmbed(self.width, tuple(self.patch_size), self.in_channels, **kw, name="tubelet_embed")(x)
        check(all(g <= m for g, m in zip(grid, self.max_grid)), "tubelet grid", grid,
              f"must fit max_grid={tuple(self.max_grid)} (learned position embeddings)")
        positions = jnp.broadcast_to(grid_positions(grid)[None], (x.shape[0], math.prod(grid), 3))
        h = h + FactorisedPosEmbed(self.width, *self.max_grid, kind="learned", **kw, name="pos_embed")(positions)
        h = ViViTEncoder(self.num_layers, self.num_heads, self.mlp_dim, self.attention, self.num_temporal_layers,
                         self.scan, self.remat, attention_impl=self.attention_impl, **kw, name="encoder")(h, grid=grid)
        pooled = h.astype(jnp.float32).mean(axis=1)
        return h, LayerNorm(1e-6, **kw, name="norm")(pooled)
