"""DALL·E's transformer: a decoder-only transformer over [text tokens ; image tokens].

Source: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (arXiv:2102.12092), Sec. 2.2 and
Appendix B.1: the caption's tokens (padded to a fixed length; each padding position its own learned
token) are followed by the dVAE's image tokens in raster order, one stream modelled
autoregressively with causal self-attention; text and image tokens have separate embeddings, text
positions a learned position embedding, image positions learned row and column embeddings. Here
the blocks are pre-LN ViT blocks (`vivit.EncoderBlock` with `causal=True`, on
`attention.Attention`) rather than DALL·E's sparse attention (a 65-token sequence needs none), text
ids come from the byte tokenizer (`tokenizer.ByteTokenizer`, pad id 0: a padding position's token
is pad embedding + its position embedding, one learned vector per position) and the two kinds of
token have separate output heads.

Shapes: text_ids int32 `(B, Lt)` in [0, text_vocab_size); image_ids int32 `(B, N)` in [0,
num_codes), N = h * w raster order; the input sequence is `[text (Lt) ; image[:, :-1] (N - 1)]`,
S = Lt + N - 1 tokens; its position `Lt - 1 + i` predicts image token i.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models import token_sampling
from genjax.models.layers import LayerNorm, logical
from genjax.models.vivit import EncoderBlock
from genjax.parallel.axes import EMBED, VOCAB

Array = jax.Array
Dtype = Any


class DalleTransformer(nn.Module):
    """Decoder-only transformer over [text ; image] tokens (DALL·E Sec. 2.2).

    Attributes:
      text_vocab_size, text_length: the text ids' vocabulary and padded length Lt.
      num_codes: the image vocabulary K (the dVAE's codes). image_grid: (h, w), N = h * w.
      hidden_size D, depth, num_heads, mlp_ratio (MLP width D * mlp_ratio), attention_impl
      (`attention.dot_product_attention`'s), dtype, param_dtype.

    Methods (`module.apply(variables, ..., method=...)`):
      embed(text_ids, image_ids) -> `(B, S, D)` in dtype, S = Lt + N - 1: token embeddings plus
        text position / image row + column embeddings (image_ids' last column is not read).
      backbone(x (B, S, D)) -> (text_logits float32 `(B, Lt - 1, text_vocab_size)`: position t
        predicts text token t + 1; image_logits float32 `(B, N, num_codes)`: logits of image token
        i, from position Lt - 1 + i). Causal: output t depends on x[:, :t + 1] only.
      __call__(text_ids, image_ids) = backbone(embed(text_ids, image_ids)).
    Params: text_embed, image_embed (normal 0.02), text_pos (Lt, D), image_row (h, D), image_col
    (w, D), blocks_i (`vivit.EncoderBlock`, causal), norm, text_head, image_head.

    Raises:
      UserError: ids of the wrong shape (before compiling).
    """
    text_vocab_size: int = 259
    text_length: int = 16
    num_codes: int = 128
    image_grid: tuple[int, int] = (7, 7)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    def setup(self):
        lt, (h, w), d = self.text_length, self.image_grid, self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = logical(nn.initializers.normal(0.02), (VOCAB, EMBED))
        self.text_embed = nn.Embed(self.text_vocab_size, d, embedding_init=init, **kw)
        self.image_embed = nn.Embed(self.num_codes, d, embedding_init=init, **kw)
        pos = logical(nn.initializers.normal(0.02), (None, EMBED))
        self.text_pos = self.param("text_pos", pos, (lt, d), self.param_dtype)
        self.image_row = self.param("image_row", pos, (h, d), self.param_dtype)
        self.image_col = self.param("image_col", pos, (w, d), self.param_dtype)
        self.blocks = [EncoderBlock(self.num_heads, int(d * self.mlp_ratio), attention_impl=self.attention_impl,
                                    causal=True, **kw) for _ in range(self.depth)]
        self.norm = LayerNorm(epsilon=1e-6, **kw)
        self.text_head = nn.Dense(self.text_vocab_size, **kw)
        self.image_head = nn.Dense(self.num_codes, **kw)

    def embed(self, text_ids: Array, image_ids: Array) -> Array:
        lt, n, d = self.text_length, self.num_image_tokens, self.hidden_size
        check(text_ids.ndim == 2 and text_ids.shape[1] == lt, "text_ids.shape", tuple(text_ids.shape),
              f"must be (B, {lt}) (text_length)")
        check(image_ids.shape == (text_ids.shape[0], n), "image_ids.shape", tuple(image_ids.shape),
              f"must be (B={text_ids.shape[0]}, {n}) (h * w of image_grid {tuple(self.image_grid)})")
        text = self.text_embed(text_ids) + self.text_pos.astype(self.dtype)
        image_pos = (self.image_row[:, None, :] + self.image_col[None, :, :]).reshape(n, d)[: n - 1]  # raster
        image = self.image_embed(image_ids[:, :-1]) + image_pos.astype(self.dtype)
        return jnp.concatenate([text, image], axis=1)

    def backbone(self, x: Array) -> tuple[Array, Array]:
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        lt = self.text_length
        return (self.text_head(x[:, : lt - 1]).astype(jnp.float32),
                self.image_head(x[:, lt - 1:]).astype(jnp.float32))

    def __call__(self, text_ids: Array, image_ids: Array) -> tuple[Array, Array]:
        return self.backbone(self.embed(text_ids, image_ids))


def generate(image_logits_fn: Callable[[Array, Array], Array], text_ids: Array, rng: Array, *,
             num_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             null_text_ids: Array | None = None, cfg_scale: float = 1.0) -> Array:
    """Image tokens drawn one at a time, in one `jax.lax.fori_loop` (jit the caller).

    Step i runs the whole causal sequence (`image_logits_fn(text_ids, image_ids) -> (B, N, K)`
    float logits) with the tokens drawn so far (later ones 0: causality makes them unread) and
    draws token i from its logits with `token_sampling.sample_logits` (temperature, top-k, top-p)
    and key `fold_in(rng, i)`. With `null_text_ids` (B, Lt) and cfg_scale != 1 the logits are
    `token_sampling.cfg_logits(cond, uncond, cfg_scale)`, uncond from the null caption (the
    batch doubled). DALL·E Sec. 2.2 / 2.3 samples this way (its re-ranking is the caller's).

    Returns: int32 `(B, num_tokens)`.
    Raises: UserError for bad sampling settings (`token_sampling.check_settings`).
    """
    b = text_ids.shape[0]
    guided = null_text_ids is not None and cfg_scale != 1.0
    ids = jnp.concatenate([text_ids, null_text_ids]) if guided else text_ids

    def body(i, image):
        logits = image_logits_fn(ids, jnp.concatenate([image, image]) if guided else image)[:, i]
        if guided:
            logits = token_sampling.cfg_logits(logits[:b], logits[b:], cfg_scale)
        token = token_sampling.sample_logits(jax.random.fold_in(rng, i), logits, temperature=temperature,
                                             top_k=top_k, top_p=top_p)
        return image.at[:, i].set(token)

    return jax.lax.fori_loop(0, num_tokens, body, jnp.zeros((b, num_tokens), jnp.int32))


VARIANTS: dict[str, dict[str, Any]] = {
    # A small transformer for MNIST's 49 image tokens.
    "mnist": dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0),
}


def Model(*, variant: str | None = None, **kw: Any) -> DalleTransformer:
    """`DalleTransformer` from a named variant (see `VARIANTS`), updated with `kw`. UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {sorted(VARIANTS)}")
    return DalleTransformer(**{**(VARIANTS[variant] if variant else {}), **kw})
