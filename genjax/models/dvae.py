"""Discrete VAE: encoder logits over K codes per latent position, Gumbel-softmax relaxation.

Source: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (DALL·E, arXiv:2102.12092),
Sec. 2.1 and Appendix A: the encoder outputs logits over K codebook vectors at each of the
h x w latent positions; training maximises the ELBO with the Gumbel-softmax relaxation (Jang,
Gu & Poole 2017; Maddison, Mnih & Teh 2017) of the categorical posterior q(z | x), the relaxed
one-hot times the codebook going to the decoder, and a KL term to the uniform prior over the K
codes; to tokenise an image the argmax code is taken at each position (no noise). The encoder
/ decoder are the LDM ones (`genjax.models.ldm_autoencoder`), as `genjax.models.vqvae.VQVAE`.

Shapes: images `(B, H, W, C)` in [-1, 1] channels-last; logits `(B, h, w, K)` float32, h = H / f,
f = 2 ** (len(block_out_channels) - 1); codes int32 `(B, h, w)` in [0, K); the codebook `(K, D)`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models.ldm_autoencoder import Decoder, Encoder, check_image, coder_kwargs
from genjax.parallel.axes import EMBED, VOCAB

Dtype = Any


def gumbel_softmax(logits: jax.Array, temperature: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """The Gumbel-softmax (concrete) relaxation of a one-hot draw from `softmax(logits)`:
    `softmax((logits + g) / temperature)` with `g ~ Gumbel(0, 1)` i.i.d. (Jang et al. 2017 eq. 1;
    Maddison et al. 2017 eq. 10); `rng=None` leaves the noise out (`g = 0`). As temperature -> 0
    it tends to `one_hot(argmax(logits + g))` (`hard_one_hot`).

    Args: logits `(..., K)` float; temperature > 0 (scalar, may be traced); rng a PRNG key or None.
    Returns: float32 `(..., K)`, non-negative, summing to 1 over the last axis.
    """
    logits = logits.astype(jnp.float32)
    if rng is not None:
        logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax(logits / temperature, axis=-1)


def hard_one_hot(logits: jax.Array) -> jax.Array:
    """`one_hot(argmax(logits))` float32 `(..., K)`: the code DALL·E's tokeniser takes (ties -> lowest k)."""
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """`KL(q || U(K))` per latent position, `q = softmax(logits)`: `sum_k q_k log q_k + log K` in
    nats, float32 `(...)` >= 0 (0 iff q is uniform, log K iff q is one-hot). DALL·E Sec. 2.1:
    the ELBO's KL between the encoder's categorical posterior and the uniform prior."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * logp, axis=-1) + math.log(logits.shape[-1])


class DiscreteVAE(nn.Module):
    """DALL·E's discrete VAE on the LDM encoder / decoder.

    Methods (`module.apply(variables, ..., method=...)`):
      logits(x (B, H, W, in_channels) in [-1, 1]) -> float32 `(B, h, w, num_codes)`.
      decode_soft(probs (B, h, w, K) float, rows summing to 1) -> `(B, H, W, out_channels)`, about
        [-1, 1]: the decoder applied to `probs @ codebook` (DALL·E: the relaxed one-hot times the
        codebook; a one-hot picks one code).
      decode_codes(codes int (B, h, w) in [0, K)) -> `(B, H, W, out_channels)`: the hard path.
      encode(x) -> int32 codes `(B, h, w)`: argmax of the logits (the tokens of the transformer).
      __call__(x, temperature, rng) -> (recon, logits): the relaxed path (Gumbel noise from rng;
        rng None: none), for training.
    Attributes as `VQVAE` (block_out_channels, layers_per_block, norm_num_groups,
    mid_block_attention, attention_impl), plus num_codes K and code_dim D (the codebook's width).
    Params: encoder (its conv_out gives the K logits), codebook (K, D), decoder.

    Raises:
      UserError: x not 4-D, wrong channel count, H or W not divisible by f (before compiling);
        probs / codes of the wrong shape.
    """
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: Sequence[int] = (32, 64, 64)
    layers_per_block: int = 1
    num_codes: int = 128
    code_dim: int = 32
    norm_num_groups: int = 16
    mid_block_attention: bool = False
    attention_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = coder_kwargs(self)
        self.encoder = Encoder(self.num_codes, double_z=False, **kw)
        self.decoder = Decoder(self.out_channels, **kw)
        # DALL·E's codebook is the decoder's first layer on the one-hot; unit-variance init
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (VOCAB, EMBED))
        self.codebook = self.param("codebook", init, (self.num_codes, self.code_dim), self.param_dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        check_image(x, self.in_channels, self.downsample_factor)
        return self.encoder(x).astype(jnp.float32)

    def decode_soft(self, probs: jax.Array) -> jax.Array:
        check(probs.ndim == 4 and probs.shape[-1] == self.num_codes, "probs.shape", tuple(probs.shape),
              f"must be (B, h, w, {self.num_codes}) (num_codes)")
        z = jnp.einsum("bhwk,kd->bhwd", probs.astype(jnp.float32), self.codebook.astype(jnp.float32))
        return self.decoder(z.astype(self.dtype))

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        check(codes.ndim == 3, "codes.shape", tuple(codes.shape), "must be (B, h, w)")
        return self.decode_soft(jax.nn.one_hot(codes, self.num_codes, dtype=jnp.float32))

    def encode(self, x: jax.Array) -> jax.Array:
        return jnp.argmax(self.logits(x), axis=-1).astype(jnp.int32)

    def __call__(self, x: jax.Array, temperature: float | jax.Array = 1.0, rng: jax.Array | None = None):
        logits = self.logits(x)
        return self.decode_soft(gumbel_softmax(logits, temperature, rng)), logits


VARIANTS: dict[str, dict[str, Any]] = {
    # f = 4 for 28 x 28 digits: 7 x 7 = 49 tokens per digit over 128 codes.
    "mnist": dict(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                  num_codes=128, code_dim=32, norm_num_groups=16, mid_block_attention=False),
}


def Model(*, variant: str | None = None, **kw: Any) -> DiscreteVAE:
    """`DiscreteVAE` from a named variant (see `VARIANTS`), updated with `kw`. UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {sorted(VARIANTS)}")
    return DiscreteVAE(**{**(VARIANTS[variant] if variant else {}), **kw})
