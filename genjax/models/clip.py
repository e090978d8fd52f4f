"""CLIP: text tower, image / video towers, projections and contrastive losses (CLIP, SigLIP).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training". Dimension letters are defined
in `genjax.models.layers`; E is the shared embedding width.

  ids (B, L) int32 + mask (B, L) bool -> TextTransformer  -> (hidden (B, L, D), pooled at EOT (B, D))
  images (B, H, W, C) in [-1, 1]      -> VisionTransformer -> (hidden (B, 1+L, D), pooled CLS (B, D))
  videos (B, T, H, W, C) in [-1, 1]   -> VideoTransformer  -> (hidden (B, L, D), mean-pooled (B, D))
  CLIP: towers -> bias-free projections to E -> L2 normalise; `clip_loss` / `siglip_loss`.

The text and image towers match transformers' `CLIPTextModel` / `CLIPVisionModel` exactly
(`load_transformers` reads their safetensors with numpy; tested to 1e-4). The video tower is
ViViT's tubelet embedding + encoder (`genjax.models.vivit`), mean-pooled. Tokenizers are in
`genjax.models.tokenizer`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.io.weights import StateDictReader, load_state_dict
from genjax.models.attention import Attention
from genjax.models.layers import LayerNorm, Mlp, PatchEmbed, logical, stack_blocks
from genjax.models.spacetime import FactorisedPosEmbed, TubeletEmbed, grid_positions
from genjax.models.vivit import ATTENTION_KINDS, ViViTEncoder
from genjax.parallel.axes import BATCH, EMBED, LENGTH, MLP, VOCAB

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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.layer_norm_eps, **kw, name="layer_norm1")(x)
        x = x + Attention(self.num_heads, **kw, name="self_attn")(h, context_mask=kv_mask, causal=self.causal)
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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, kv_mask: Array | None = None) -> Array:
        check(self.activation in ACTIVATIONS, "activation", self.activation, f"must be one of {list(ACTIVATIONS)}")
        block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
                        layer_norm_eps=self.layer_norm_eps, causal=self.causal, dtype=self.dtype,
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
                        causal=True, scan=self.scan, remat=self.remat, **kw, name="transformer")(
            h, None if mask is None else mask.astype(bool))
        h = LayerNorm(self.layer_norm_eps, **kw, name="final_layer_norm")(h)
        eot = jnp.argmax(ids if self.eos_token_id is None else (ids == self.eos_token_id).astype(jnp.int32), -1)
        return h, h[jnp.arange(b), eot]


def _pair(x) -> tuple[int, int]:
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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        (hh, ww), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
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
                        scan=self.scan, remat=self.remat, **kw, name="transformer")(h)
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
                         self.scan, self.remat, **kw, name="encoder")(h, grid=grid)
        pooled = h.astype(jnp.float32).mean(axis=1)
        return h, LayerNorm(1e-6, **kw, name="norm")(pooled)


# --------------------------------------------------------------------------- CLIP


def _normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nn.Module):
    """CLIP / SigLIP: text, image and (optionally) video towers with bias-free projections to E.

    Attributes:
      embed_dim: E. loss: "clip" (softmax InfoNCE; `logit_scale` init log(1/0.07)) or "siglip"
        (sigmoid; `logit_scale` init log(10), `logit_bias` init -10).
      Text: vocab_size, context_length, text_width, text_layers, text_heads, eos_token_id
        (see `TextTransformer`). Image: image_size, patch_size, in_channels, vision_width,
        vision_layers, vision_heads. Video (None = no video tower): video_patch_size (pt, ph, pw),
        video_max_grid, video_attention, video_layers, video_temporal_layers; width and heads
        are vision_width / vision_heads. MLPs are 4x wide. activation: `ACTIVATIONS` key.

    Methods (each returns L2-normalised float32 `(B, E)`):
      encode_text(ids (B, L) int, mask (B, L) bool | None), encode_image(images (B, H, W, C) in
      [-1, 1]), encode_video(videos (B, T, H, W, C) in [-1, 1]).
      __call__(ids=None, mask=None, images=None, videos=None) -> dict with "text" / "image" /
      "video" for the inputs given, plus the raw (log) "logit_scale" and, for SigLIP,
      "logit_bias" — the arguments of `clip_loss` / `siglip_loss`. Init with every input to
      create every parameter.

    Raises:
      UserError: unknown loss; a video input without a video tower; the towers' input errors.

    Source: Radford et al. 2021 (fig. 3 pseudo-code); Zhai et al. 2023 (SigLIP, sec. 3);
      parameter count of "ViT-B/32" equals transformers `CLIPModel` (tested).
    """

    embed_dim: int = 512
    loss: str = "clip"
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    eos_token_id: int | None = None
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (32, 32)
    in_channels: int = 3
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    video_patch_size: tuple[int, int, int] | None = None
    video_max_grid: tuple[int, int, int] = (8, 14, 14)
    video_attention: str = "joint"
    video_layers: int = 12
    video_temporal_layers: int = 4
    activation: str = "quick_gelu"
    scan: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        check(self.loss in ("clip", "siglip"), "loss", self.loss, "must be 'clip' or 'siglip'")
        kw = dict(scan=self.scan, remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        self.text = TextTransformer(self.vocab_size, self.context_length, self.text_width, self.text_layers,
                                    self.text_heads, 4 * self.text_width, self.activation,
                                    eos_token_id=self.eos_token_id, **kw)
        self.vision = VisionTransformer(self.image_size, self.patch_size, self.in_channels, self.vision_width,
                                        self.vision_layers, self.vision_heads, 4 * self.vision_width,
                                        self.activation, **kw)
        self.video = None if self.video_patch_size is None else VideoTransformer(
            tuple(self.video_patch_size), self.in_channels, tuple(self.video_max_grid), self.vision_width,
            self.video_layers, self.vision_heads, 4 * self.vision_width, self.video_attention,
            self.video_temporal_layers, **kw)

        def proj(name):
            init = logical(nn.initializers.lecun_normal(), (EMBED, MLP))
            return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=init, name=name)

        self.text_projection, self.visual_projection = proj("text_projection"), proj("visual_projection")
        self.video_projection = None if self.video is None else proj("video_projection")
        siglip = self.loss == "siglip"
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0 if siglip else 1 / 0.07)),
                                      (), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (), jnp.float32) if siglip else None

    def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
        return _normalize(self.text_projection(self.text(ids, mask)[1]))

    def encode_image(self, images: Array) -> Array:
        return _normalize(self.visual_projection(self.vision(images)[1]))

    def encode_video(self, videos: Array) -> Array:
        check(self.video is not None, "video_patch_size", None, "this CLIP has no video tower (set video_patch_size)")
        return _normalize(self.video_projection(self.video(videos)[1]))

    def __call__(self, ids: Array | None = None, mask: Array | None = None, images: Array | None = None,
                 videos: Array | None = None) -> dict[str, Array]:
        out = {"logit_scale": self.logit_scale}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if ids is not None:
            out["text"] = self.encode_text(ids, mask)
        if images is not None:
            out["image"] = self.encode_image(images)
        if videos is not None:
            out["video"] = self.encode_video(videos)
        return out


# --------------------------------------------------------------------------- losses


def _gather(x: Array, axis_name) -> tuple[Array, Array]:
    """All-gather the batch over `axis_name` (inside shard_map): (global x, this shard's offset)."""
    if axis_name is None:
        return x, jnp.int32(0)
    return jax.lax.all_gather(x, axis_name, tiled=True), jax.lax.axis_index(axis_name) * x.shape[0]


def clip_loss(img_emb: Array, txt_emb: Array, logit_scale: Array, *, axis_name: Any = None) -> Array:
    """Symmetric InfoNCE over the whole global batch: `mean(CE(l, I) + CE(l^T, I)) / 2`.

    `l = min(exp(logit_scale), 100) * img_emb @ txt_emb^T`; pair i is (image i, text i), every
    other text / image in the GLOBAL batch is a negative.

    Args:
      img_emb, txt_emb: `(n, E)` L2-normalised embeddings (any float dtype; computed in float32).
        Under `jax.jit` with batch-sharded inputs, pass them as they are: the global batch is
        the full array and XLA gathers what it needs.
      logit_scale: scalar, the log of the inverse temperature (CLIP's learnable `t`).
      axis_name: inside `jax.shard_map`, the mesh axis (or tuple of axes) the batch is split
        over; each shard then holds its local `(n / shards, E)` rows, the other shards'
        embeddings are `all_gather`ed as negatives, and every shard returns the global loss.

    Returns:
      scalar float32 >= 0 (log n at chance for a uniform l).

    Source: Radford et al. 2021 fig. 3; the temperature clamp at 100 as OpenAI CLIP's training;
      per-shard rows + all-gather as OpenCLIP's `gather_with_grad` (equal to 1 device, tested).
    """
    img, txt = img_emb.astype(jnp.float32), txt_emb.astype(jnp.float32)
    scale = jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), 100.0)
    all_img, offset = _gather(img, axis_name)
    all_txt, _ = _gather(txt, axis_name)
    labels = offset + jnp.arange(img.shape[0])

    def nll(logits):  # (b, n) rows of this shard -> sum of -log softmax at the label
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1))

    total = nll(scale * img @ all_txt.T) + nll(scale * txt @ all_img.T)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total / (2 * all_img.shape[0])


def siglip_loss(img_emb: Array, txt_emb: Array, logit_scale: Array, logit_bias: Array, *,
                axis_name: Any = None) -> Array:
    """Sigmoid loss over the whole global batch: `-sum(log_sigmoid(z * l)) / n`.

    `l = exp(logit_scale) * img_emb @ txt_emb^T + logit_bias` `(n, n)`, z = +1 on the diagonal
    (matching pairs) and -1 elsewhere, n the global batch size.

    Args:
      img_emb, txt_emb: `(n, E)` L2-normalised (computed in float32); jit-sharded as they are.
      logit_scale: scalar log temperature (init log 10); logit_bias: scalar (init -10).
      axis_name: inside `jax.shard_map`, the batch mesh axis (or axes): each shard scores its
        local images against the all-gathered texts; every shard returns the global loss.

    Returns:
      scalar float32 >= 0.

    Source: Zhai et al. 2023, algorithm 1 (equal to 1 device under sharding, tested).
    """
    img, txt = img_emb.astype(jnp.float32), txt_emb.astype(jnp.float32)
    all_txt, offset = _gather(txt, axis_name)
    logits = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * img @ all_txt.T + jnp.asarray(logit_bias, jnp.float32)
    z = jnp.where(offset + jnp.arange(img.shape[0])[:, None] == jnp.arange(all_txt.shape[0])[None], 1.0, -1.0)
    total = -jnp.sum(jax.nn.log_sigmoid(z * logits))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total / all_txt.shape[0]


# --------------------------------------------------------------------------- zero-shot


def zero_shot_accuracy(params: Any, module: CLIP, images: np.ndarray, labels: np.ndarray, tokenizer: Any, *,
                       prompts: Sequence[str] = tuple(f"digit {n}" for n in range(10)),
                       batch_size: int = 500) -> float:
    """Zero-shot classification accuracy: each image gets the class whose prompt embeds closest.

    Args:
      params: the CLIP's variables (`{"params": ...}`, boxed or plain).
      module: the `CLIP`.
      images: `(N, H, W, C)` images or `(N, T, H, W, C)` videos (video tower), uint8 in
        [0, 255] (scaled to [-1, 1]) or float already in [-1, 1].
      labels: `(N,)` int, the index of the true prompt.
      tokenizer: `encode(texts, max_length) -> (ids, mask)` (`genjax.models.tokenizer`).
      prompts: one text per class; default "digit 0" ... "digit 9".
      batch_size: images per jitted forward.

    Returns:
      accuracy in [0, 1] (chance = 1 / len(prompts)).

    Raises:
      UserError: images not 4-D / 5-D, or labels not `(N,)`.

    Source: Radford et al. 2021 sec. 3.1.2 (zero-shot transfer with prompts).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    check(images.ndim in (4, 5), "images.shape", images.shape, "must be (N, H, W, C) or (N, T, H, W, C)")
    check(labels.shape == images.shape[:1], "labels.shape", labels.shape, f"must be (N,)={images.shape[:1]}")
    ids, mask = tokenizer.encode(list(prompts), module.context_length)
    text = jax.jit(functools.partial(module.apply, method=CLIP.encode_text))(params, ids, mask)
    method = CLIP.encode_image if images.ndim == 4 else CLIP.encode_video
    encode = jax.jit(functools.partial(module.apply, method=method))
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        pred = np.asarray(jnp.argmax(encode(params, x) @ text.T, axis=-1))
        correct += int((pred == labels[start:start + batch_size]).sum())
    return correct / len(images)


# --------------------------------------------------------------------------- transformers weights

_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}


def _tower_kwargs(r: StateDictReader, prefix: str, cfg: Mapping[str, Any], text: bool) -> dict[str, Any]:
    """A tower's hyper-parameters from its transformers config, or from the tensor shapes."""
    layers = 0
    while r.has(f"{prefix}encoder.layers.{layers}.layer_norm1.weight"):
        layers += 1
    fc1 = r.get(f"{prefix}encoder.layers.0.mlp.fc1.weight") if layers else np.zeros((0, 0))
    if text:
        vocab, width = r.get(prefix + "embeddings.token_embedding.weight").shape
        kw = dict(vocab_size=cfg.get("vocab_size", vocab), width=cfg.get("hidden_size", width),
                  context_length=cfg.get("max_position_embeddings",
                                         r.get(prefix + "embeddings.position_embedding.weight").shape[0]))
        eos = cfg.get("eos_token_id")
        kw["eos_token_id"] = None if eos in (None, 2) else int(eos)  # 2: transformers' legacy argmax pooling
    else:
        width, channels, ph, pw = r.get(prefix + "embeddings.patch_embedding.weight").shape
        side = math.isqrt(r.get(prefix + "embeddings.position_embedding.weight").shape[0] - 1)
        image, patch = cfg.get("image_size", side * ph), cfg.get("patch_size", ph)
        kw = dict(image_size=_pair(image), patch_size=_pair(patch), in_channels=cfg.get("num_channels", channels),
                  width=cfg.get("hidden_size", width))
    act = cfg.get("hidden_act", "quick_gelu")
    check(act in _HF_ACTIVATIONS, "hidden_act", act, f"must be one of {list(_HF_ACTIVATIONS)}")
    kw.update(num_layers=cfg.get("num_hidden_layers", layers), mlp_dim=cfg.get("intermediate_size", fc1.shape[0]),
              activation=_HF_ACTIVATIONS[act], layer_norm_eps=cfg.get("layer_norm_eps", 1e-5))
    if "num_attention_heads" in cfg:
        kw["num_heads"] = cfg["num_attention_heads"]
    return kw


def _tower_params(r: StateDictReader, prefix: str, kw: Mapping[str, Any], text: bool, scan: bool) -> dict:
    """transformers `CLIPTextModel` / `CLIPVisionModel` tensors -> our tower's params."""
    d, n, m = kw["width"], kw["num_heads"], kw["mlp_dim"]
    k = d // n

    def dense(key, shape_in, shape_out):  # torch Linear (out, in) -> DenseGeneral kernel (*in, *out)
        w = r.get(key + ".weight", (math.prod(shape_out), math.prod(shape_in)))
        b = r.get(key + ".bias", (math.prod(shape_out),))
        return {"kernel": w.T.reshape(*shape_in, *shape_out), "bias": b.reshape(shape_out)}

    def norm(key):
        return {"norm": {"scale": r.get(key + ".weight", (d,)), "bias": r.get(key + ".bias", (d,))}}

    blocks = []
    for i in range(kw["num_layers"]):
        p = f"{prefix}encoder.layers.{i}."
        attn = {name: dense(p + f"self_attn.{src}_proj", (d,), (n, k)) for name, src in
                (("to_q", "q"), ("to_k", "k"), ("to_v", "v"))}
        attn["to_out"] = dense(p + "self_attn.out_proj", (n, k), (d,))
        blocks.append({"layer_norm1": norm(p + "layer_norm1"), "self_attn": attn, "layer_norm2": norm(p + "layer_norm2"),
                       "mlp": {"fc1": dense(p + "mlp.fc1", (d,), (m,)), "fc2": dense(p + "mlp.fc2", (m,), (d,))}})
    if scan:
        stack = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)} if blocks else {}
    else:
        stack = {f"layers_{i}": b for i, b in enumerate(blocks)}
    e = prefix + "embeddings."
    if r.has(e + "position_ids"):  # a buffer older checkpoints saved
        r.get(e + "position_ids")
    if text:
        return {"token_embedding": {"embedding": r.get(e + "token_embedding.weight", (kw["vocab_size"], d))},
                "position_embedding": r.get(e + "position_embedding.weight", (kw["context_length"], d)),
                "transformer": stack, "final_layer_norm": norm(prefix + "final_layer_norm")}
    (hh, ww), (ph, pw) = kw["image_size"], kw["patch_size"]
    conv = r.get(e + "patch_embedding.weight", (d, kw["in_channels"], ph, pw))
    return {"patch_embed": {"proj": {"kernel": conv.transpose(2, 3, 1, 0)}},
            "class_embedding": r.get(e + "class_embedding", (d,)),
            "position_embedding": r.get(e + "position_embedding.weight", ((hh // ph) * (ww // pw) + 1, d)),
            "pre_layernorm": norm(prefix + "pre_layrnorm"), "transformer": stack,
            "post_layernorm": norm(prefix + "post_layernorm")}


def _check_heads(kw, field):
    check(kw.get(field) is not None, field, None,
          "must be given (a bare state dict does not record the number of attention heads)")
    width = kw["width"] if "width" in kw else kw[field.replace("heads", "width")]
    check(width % kw[field] == 0, field, kw[field], f"must divide the width {width}")


def load_transformers(src: Any, **overrides) -> tuple[nn.Module, dict]:
    """Load transformers CLIP weights: `CLIPTextModel`, `CLIPVisionModel` or a whole `CLIPModel`.

    Args:
      src: a folder with `model.safetensors` (+ `config.json`), a `.safetensors` file, or an
        in-memory state dict (`{key: array}`; then the number of heads must be in overrides:
        `num_heads` for a tower, `text_heads` and `vision_heads` for a CLIPModel). Keys may
        carry the `text_model.` / `vision_model.` prefix of saved towers.
      overrides: module kwargs that replace the config's (e.g. `dtype`, `scan=True`).

    Returns:
      `(module, params)`: a `TextTransformer`, `VisionTransformer` or `CLIP` and its params
      (plain float32 numpy arrays, the tree of `nn.unbox(module.init(...))["params"]`). The
      transformers config's `eos_token_id == 2` (old OpenAI configs) maps to argmax pooling, as
      transformers does.

    Raises:
      UserError: unreadable src; missing / extra keys or wrong shapes (another model family or
        config); an activation we do not have; heads missing or not dividing the width; a
        CLIPModel whose MLPs are not 4x wide or whose towers use different activations.

    Source: transformers 5.x `modeling_clip.py` key names; outputs equal `CLIPTextModel` /
      `CLIPVisionModel` / `CLIPModel.get_*_features` (tested to 1e-4 with random weights).
    """
    state, cfg = load_state_dict(src)
    r = StateDictReader(state, "transformers CLIP")
    scan = bool(overrides.get("scan", False))
    if r.has("text_model.embeddings.token_embedding.weight") and r.has("vision_model.embeddings.patch_embedding.weight"):
        text_kw = _tower_kwargs(r, "text_model.", cfg.get("text_config", {}), True)
        vis_kw = _tower_kwargs(r, "vision_model.", cfg.get("vision_config", {}), False)
        embed = r.get("text_projection.weight").shape[0]
        kw = {**dict(embed_dim=cfg.get("projection_dim", embed), vocab_size=text_kw["vocab_size"],
                  context_length=text_kw["context_length"], text_width=text_kw["width"],
                  text_layers=text_kw["num_layers"], text_heads=text_kw.get("num_heads"),
                  eos_token_id=text_kw["eos_token_id"], image_size=vis_kw["image_size"],
                  patch_size=vis_kw["patch_size"], in_channels=vis_kw["in_channels"],
                  vision_width=vis_kw["width"], vision_layers=vis_kw["num_layers"],
                  vision_heads=vis_kw.get("num_heads"), activation=text_kw["activation"]), **overrides}
        for tower, prefix in ((text_kw, "text"), (vis_kw, "vision")):
            check(tower["mlp_dim"] == 4 * tower["width"], f"{prefix}_config.intermediate_size", tower["mlp_dim"],
                  f"must be 4 x hidden_size={tower['width']} for genjax CLIP")
            check(tower["layer_norm_eps"] == 1e-5, f"{prefix}_config.layer_norm_eps", tower["layer_norm_eps"],
                  "must be 1e-5 for genjax CLIP")
            tower["num_heads"] = kw[f"{prefix}_heads"]
            _check_heads(kw, f"{prefix}_heads")
        check(vis_kw["activation"] == text_kw["activation"], "vision_config.hidden_act", vis_kw["activation"],
              f"must equal the text tower's {text_kw['activation']!r} for genjax CLIP")
        e = kw["embed_dim"]
        params = {"text": _tower_params(r, "text_model.", text_kw, True, scan),
                  "vision": _tower_params(r, "vision_model.", vis_kw, False, scan),
                  "text_projection": {"kernel": r.get("text_projection.weight", (e, kw["text_width"])).T},
                  "visual_projection": {"kernel": r.get("visual_projection.weight", (e, kw["vision_width"])).T},
                  "logit_scale": np.asarray(r.get("logit_scale", ()), np.float32)}
        module: nn.Module = CLIP(**kw)
    else:
        state = {k.removeprefix("text_model.").removeprefix("vision_model."): v for k, v in state.items()}
        r = StateDictReader(state, "transformers CLIPTextModel / CLIPVisionModel")
        text = r.has("embeddings.token_embedding.weight")
        check(text or r.has("embeddings.patch_embedding.weight"), "src", "state dict", "holds no transformers "
              "CLIPTextModel / CLIPVisionModel / CLIPModel embeddings (wrong model family?)")
        kw = {**_tower_kwargs(r, "", cfg, text), **overrides}
        _check_heads(kw, "num_heads")
        params = _tower_params(r, "", kw, text, scan)
        module = (TextTransformer if text else VisionTransformer)(**kw)
    r.finish()
    return module, params


# --------------------------------------------------------------------------- variants


def _openai(width, layers, heads, patch, image=224, embed=512, text_width=512, text_heads=8):
    return dict(embed_dim=embed, vocab_size=49408, context_length=77, text_width=text_width, text_layers=12,
                text_heads=text_heads, image_size=(image, image), patch_size=(patch, patch), in_channels=3,
                vision_width=width, vision_layers=layers, vision_heads=heads, activation="quick_gelu")


VARIANTS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP (Radford et al. 2021, table 20); "ViT-B/32" is 151,277,313 parameters.
    "ViT-B/32": _openai(768, 12, 12, 32),
    "ViT-B/16": _openai(768, 12, 12, 16),
    "ViT-L/14": _openai(1024, 24, 16, 14, embed=768, text_width=768, text_heads=12),
    # Moving MNIST / MNIST: byte tokenizer (vocab 259, EOT = largest id), 28x28 digits in 7x7
    # patches, 8-frame 32x32 videos in 2x8x8 tubelets (a 4x4x4 grid).
    "tiny": dict(embed_dim=64, vocab_size=259, context_length=32, text_width=64, text_layers=2, text_heads=2,
                 image_size=(28, 28), patch_size=(7, 7), in_channels=1, vision_width=64, vision_layers=2,
                 vision_heads=2, video_patch_size=(2, 8, 8), video_max_grid=(4, 4, 4), video_layers=2,
                 video_temporal_layers=1, activation="gelu_tanh"),
}


def Model(*, variant: str | None = None, **kw) -> CLIP:
    """A `CLIP` of a named variant ("ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return CLIP(**{**(VARIANTS[variant] if variant else {}), **kw})
