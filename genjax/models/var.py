"""VAR: visual autoregressive modelling by next-scale prediction, and its multi-scale VQ tokenizer.

Tian, Jiang, Yuan, Peng & Wang 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction" (arXiv:2404.02905), Algorithms 1-2 and sec. 3-4; the math follows the
reference code FoundationVision/VAR (`models/quant.py` `VectorQuantizer2`, `models/var.py`,
`models/basic_var.py`). Channels-last throughout; K scales s_1 < ... < s_K = h = w of the latent.

Tokenizer (`MultiScaleQuantizer`, the bottleneck of `vqvae.VQVAE(scales=...)`): a latent f
(B, h, w, C) becomes K token maps r_k (B, s_k, s_k) from one codebook (V, C):

    rest = f, f_hat = 0;  for k = 1..K:
      r_k  = argmin_v || area(rest, s_k) - e_v ||^2         area = torch's "area" interpolation
      h_k  = phi_k(bicubic(e[r_k], h))                        bicubic = torch's, a = -0.75
      f_hat += h_k;  rest -= h_k
    phi_k(x) = (1 - q) x + q conv3x3_k(x), q = quant_resi (0.5); num_phi convs shared by scales
    (`phi_index`, VAR's PhiPartiallyShared ticks); area / bicubic are identities at s_k = h.

Tokens are flattened scale by scale, row-major: (B, L), L = sum_k s_k^2 (VAR's `idxBl`).

Transformer (`VAR`): token l of scale k predicts r_k from the class and the coarser scales:
    input of scale 1 = class embedding + pos_start (the start token, SOS)
    input of scale k > 1 = word_embed(area(f_hat_{k-1}, s_k))   (`MultiScaleQuantizer.var_input`)
    + absolute position embedding + level (scale) embedding
    -> depth x adaLN-Zero blocks (`dit.DiTBlock`, conditioned on the class embedding) with the
       block-causal mask (a token of scale k attends to every token of scales <= k)
    -> adaLN head (`adaln.FinalLayer`) -> logits (B, L, V).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.models.adaln import FinalLayer, cfg_drop, embed_labels
from genjax.models.conv import conv2d
from genjax.models.dit import DiTBlock
from genjax.models.layers import logical
from genjax.models.vqvae import nearest_code, perplexity
from genjax.parallel.axes import EMBED, VOCAB

Dtype = Any
Array = jax.Array


# ----------------------------------------------------------------------------- interpolation

def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` float32 matrix of torch's `F.interpolate(mode="area")` along one axis
    (adaptive average pooling: output i averages inputs floor(i n_in / n_out) .. ceil((i+1) n_in
    / n_out) - 1). The identity when n_in == n_out."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """`(n_out, n_in)` float32 matrix of torch's `F.interpolate(mode="bicubic",
    align_corners=False)` along one axis (Keys cubic convolution with a = -0.75, source
    coordinate (i + 0.5) n_in / n_out - 0.5, taps clamped to the border). Rows sum to 1; the
    identity when n_in == n_out."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(src)
        t = src - x0
        for tap, w in zip(range(x0 - 1, x0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            m[i, min(max(tap, 0), n_in - 1)] += w
    return m.astype(np.float32)


def resize(x: Array, size: int, kind: str) -> Array:
    """`(B, H, W, C)` -> `(B, size, size, C)` float32 by `area_matrix` ("area") or `bicubic_matrix`
    ("bicubic") along H and W (separable, as torch's); x itself when already that size."""
    if x.shape[1:3] == (size, size):
        return x.astype(jnp.float32)
    make = area_matrix if kind == "area" else bicubic_matrix
    mh, mw = jnp.asarray(make(x.shape[1], size)), jnp.asarray(make(x.shape[2], size))
    return jnp.einsum("hH,wW,bHWc->bhwc", mh, mw, x.astype(jnp.float32))


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
    """Which of `num_phi` phi convs scale k (0-based, of `num_scales`) uses: the one whose tick is
    nearest k / (K - 1), ticks = linspace(1/(3n), 1 - 1/(3n), n) for n = 4, else linspace(1/(2n),
    1 - 1/(2n), n) (VAR `PhiPartiallyShared` / `PhiNonShared`; n = K gives one per scale)."""
    d = 3 if num_phi == 4 else 2
    ticks = np.linspace(1 / d / num_phi, 1 - 1 / d / num_phi, num_phi)
    return int(np.argmin(np.abs(ticks - k / max(num_scales - 1, 1))))


def token_count(scales: Sequence[int]) -> int:
    """L = sum of s_k^2."""
    return int(sum(s * s for s in scales))


def level_ids(scales: Sequence[int]) -> np.ndarray:
    """`(L,)` int32: the scale index k of each token (VAR `lvl_1L`)."""
    return np.concatenate([np.full(s * s, k, np.int32) for k, s in enumerate(scales)])


def block_causal_mask(scales: Sequence[int]) -> np.ndarray:
    """`(L, L)` bool, True where query l may attend to key s: level(s) <= level(l) (VAR
    `attn_bias_for_masking`: 0 where d >= dT, -inf elsewhere)."""
    lvl = level_ids(scales)
    return lvl[None, :] <= lvl[:, None]


# ----------------------------------------------------------------------------- tokenizer

class Phi(nn.Module):
    """`(1 - ratio) h + ratio conv3x3(h)` on `(B, H, W, C)` (VAR `Phi`); param `conv`."""
    ratio: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array) -> Array:
        conv = conv2d(h.shape[-1], 3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        return (1 - self.ratio) * h + self.ratio * conv(h).astype(jnp.float32)


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantiser (`VectorQuantizer2`, module docstring), one codebook.

    Call: `z_q, indices, aux = q.apply(variables, z, train=...)` with `vqvae.VectorQuantizer`'s
    contract: z `(B, h, w, C)` float, h = w = scales[-1]; z_q `(B, h, w, C)` = f_hat with
    straight-through gradients `z + sg(f_hat - z)`; indices int32 `(B, L)` in [0, num_codes), the
    K token maps flattened scale by scale; aux float32 scalars: `codebook_loss` = mean_k
    mean (f_hat_k - sg z)^2, `commitment_loss` = mean_k mean (sg f_hat_k - z)^2 (f_hat_k the sum
    after scale k; equal in value), `loss` = codebook_loss + beta commitment_loss (VAR's
    `mean_vq_loss`; the codebook and the phi convs learn through f_hat_k), `perplexity` and
    `counts (num_codes,)` over all L tokens. The nearest codes are picked without gradient.

    Params: `codebook (V, C)` (variance-scaling uniform, as `VectorQuantizer`), `phi_j/conv`
    for j < num_phi (none when quant_resi = 0: phi is the identity).

    Raises:
      UserError: z not `(B, s_K, s_K, code_dim)`; indices not `(B, L)` (before compiling).
    """

    num_codes: int
    code_dim: int
    scales: tuple[int, ...]
    beta: float = 0.25
    quant_resi: float = 0.5
    num_phi: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)
        self.codebook = self.param("codebook", nn.with_logical_partitioning(init, (VOCAB, EMBED)),
                                   (self.num_codes, self.code_dim), self.param_dtype)
        if abs(self.quant_resi) > 1e-6:
            self.phi = [Phi(abs(self.quant_resi), self.dtype, self.param_dtype, name=f"phi_{j}")
                        for j in range(self.num_phi)]

    def _phi(self, k: int, h: Array) -> Array:
        if abs(self.quant_resi) <= 1e-6:
            return h
        return self.phi[phi_index(k, len(self.scales), self.num_phi)](h)

    def code_map(self, k: int, idx: Array) -> Array:
        """h_k = phi_k(bicubic(e[idx], h)): int `(B, s_k^2)` or `(B, s_k, s_k)` -> `(B, h, w, C)` float32."""
        s, full = self.scales[k], self.scales[-1]
        e = jnp.take(self.codebook, idx.reshape(idx.shape[0], s, s), axis=0).astype(jnp.float32)
        return self._phi(k, resize(e, full, "bicubic"))

    def accumulate(self, f_hat: Array, k: int, idx: Array) -> Array:
        """`f_hat + code_map(k, idx)` (VAR `get_next_autoregressive_input`'s f_hat)."""
        return f_hat + self.code_map(k, idx)

    def split(self, indices: Array) -> list[Array]:
        """`(B, L)` tokens -> K maps `(B, s_k^2)`."""
        check(indices.ndim == 2 and indices.shape[1] == token_count(self.scales), "indices.shape",
              tuple(indices.shape), f"must be (B, L={token_count(self.scales)}) for scales {self.scales}")
        return jnp.split(indices, np.cumsum([s * s for s in self.scales])[:-1], axis=1)

    def f_hat(self, indices: Array) -> Array:
        """`(B, L)` tokens -> f_hat `(B, h, w, C)` float32 = sum_k code_map(k, r_k) (VAR `embed_to_fhat`)."""
        f_hat = 0.0
        for k, idx in enumerate(self.split(indices)):
            f_hat = self.accumulate(f_hat, k, idx)
        return f_hat

    def var_input(self, indices: Array) -> Array:
        """Teacher-forcing input of scales 2..K: `(B, L - s_1^2, C)` float32, scale k's part being
        area(f_hat_{k-1}, s_k) flattened row-major (VAR `idxBl_to_var_input`)."""
        parts, f_hat = [], 0.0
        for k, idx in enumerate(self.split(indices)[:-1]):
            f_hat = self.accumulate(f_hat, k, idx)
            nxt = resize(f_hat, self.scales[k + 1], "area")
            parts.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
        b = indices.shape[0]
        return jnp.concatenate(parts, axis=1) if parts else jnp.zeros((b, 0, self.code_dim), jnp.float32)

    def __call__(self, z: Array, *, train: bool = False):
        del train  # no EMA statistics: the codebook is a parameter
        full = self.scales[-1]
        check(z.ndim == 4 and z.shape[1:] == (full, full, self.code_dim), "z.shape", tuple(z.shape),
              f"must be (B, {full}, {full}, {self.code_dim}): the last scale is the latent side")
        f = z.astype(jnp.float32)
        f_ng = jax.lax.stop_gradient(f)
        rest, f_hat, tokens, cb, cm = f_ng, 0.0, [], [], []
        codebook = jax.lax.stop_gradient(self.codebook)
        for k, s in enumerate(self.scales):
            idx = nearest_code(resize(rest, s, "area"), codebook)  # (B, s, s)
            h = self.code_map(k, idx)
            f_hat, rest = f_hat + h, rest - jax.lax.stop_gradient(h)
            tokens.append(idx.reshape(idx.shape[0], -1))
            cb.append(jnp.mean(jnp.square(f_hat - f_ng)))
            cm.append(jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f)))
        indices = jnp.concatenate(tokens, axis=1)
        codebook_loss, commitment_loss = sum(cb) / len(cb), sum(cm) / len(cm)
        counts = jnp.sum(jax.nn.one_hot(indices.reshape(-1), self.num_codes, dtype=jnp.int32), axis=0)
        aux = {"loss": codebook_loss + self.beta * commitment_loss, "codebook_loss": codebook_loss,
               "commitment_loss": commitment_loss, "perplexity": perplexity(indices, self.num_codes),
               "counts": counts}
        z_q = (f + jax.lax.stop_gradient(f_hat - f)).astype(z.dtype)
        return z_q, indices, aux


# ----------------------------------------------------------------------------- transformer

class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer (module docstring; VAR `models/var.py`).

    Attributes:
      scales: s_1 < ... < s_K, the tokenizer's (`VQVAE.scales`). vocab_size: V, its num_codes.
      code_dim: C, its latent_channels. num_classes: labels 0..num_classes-1; id num_classes is the
        null class of classifier-free guidance. class_dropout_prob: label dropout in training
        (VAR `cond_drop_rate` 0.1). hidden_size / depth / num_heads / mlp_ratio: the blocks.
      attention_impl: "auto" or "xla" (the block-causal mask is an explicit mask).

    Differences from the reference, on purpose: plain per-block adaLN-Zero (`dit.DiTBlock`, gates
    and head zero-initialised) instead of VAR's shared adaLN and its init scalings; the usual
    1/sqrt(head_dim) attention scale; no KV cache (sampling recomputes the prefix).

    `__call__(y, x_in, *, train=False, force_drop_ids=None)`:
      y: int `(B,)` labels in [0, num_classes] (num_classes = unconditional).
      x_in: `(B, l - s_1^2, C)` float, the inputs of scales 2..k (`MultiScaleQuantizer.var_input`
        or a prefix of it), l = s_1^2 + ... + s_k^2 for some k (the sequence is cut after scale k).
      train: drop labels with class_dropout_prob (rng "dropout"); force_drop_ids `(B,)` 1 = null.
      Returns logits `(B, l, V)` float32; those of scale k depend only on y and scales < k.

    Raises:
      UserError: l not a prefix sum of the scales, C wrong, labels not integers or out of range.
    """

    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 7)
    vocab_size: int = 128
    code_dim: int = 8
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Array, x_in: Array, *, train: bool = False, force_drop_ids: Array | None = None) -> Array:
        check(x_in.ndim == 3 and x_in.shape[-1] == self.code_dim, "x_in.shape", tuple(x_in.shape),
              f"must be (B, l - first, {self.code_dim})")
        first, prefix = self.scales[0] ** 2, np.cumsum([s * s for s in self.scales])
        b, l = x_in.shape[0], x_in.shape[1] + first
        check(l in prefix, "x_in.shape[1]", x_in.shape[1],
              f"must be s_2^2 + ... + s_k^2 for some k (scales {self.scales})")
        d, kw = self.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = cfg_drop(self, (b,), self.class_dropout_prob, train, force_drop_ids)
        c = embed_labels(y, drop, self.num_classes, True, d, **kw, name="class_emb").astype(jnp.float32)
        init = logical(nn.initializers.truncated_normal(math.sqrt(1 / d / 3)), (None, None, EMBED))
        pos_start = self.param("pos_start", init, (1, first, d), self.param_dtype)
        pos = self.param("pos_embed", init, (1, token_count(self.scales), d), self.param_dtype)
        lvl = nn.Embed(len(self.scales), d, **kw, name="level_embed",
                       embedding_init=logical(nn.initializers.truncated_normal(math.sqrt(1 / d / 3)), (None, EMBED)))
        x = c[:, None, :] + pos_start
        if l > first:
            words = nn.Dense(d, **kw, name="word_embed")(x_in.astype(self.dtype)).astype(jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(x, (b, first, d)), words], axis=1)
        x = (x + pos[:, :l] + lvl(jnp.asarray(level_ids(self.scales)[:l]))[None]).astype(self.dtype)
        mask = jnp.asarray(block_causal_mask(self.scales)[:l, :l])[None, None]
        for i in range(self.depth):
            x = DiTBlock(d, self.num_heads, self.mlp_ratio, attention_impl=self.attention_impl, **kw,
                         name=f"blocks_{i}")(x, c, mask=mask)
        return FinalLayer(self.vocab_size, **kw, name="head")(x, c)


VARIANTS: dict[str, dict[str, Any]] = {
    # the CPU-sized model of experiments/var_mnist (1.25 M parameters with 128 codes of width 8)
    "mnist": dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0),
    # VAR-d16 of the paper (Table 1: depth 16, width 1024, 16 heads)
    "d16": dict(hidden_size=1024, depth=16, num_heads=16, mlp_ratio=4.0),
}


def Model(*, variant: str | None = None, **kw: Any) -> VAR:
    """`VAR` from a named variant (see `VARIANTS`), updated with `kw`. UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {sorted(VARIANTS)}")
    return VAR(**{**(VARIANTS[variant] if variant else {}), **kw})
