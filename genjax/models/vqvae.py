"""VQ-VAE: nearest-code vector quantiser with straight-through gradients.

Source: van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning"
(arXiv:1711.00937), eq. 3 (loss) and Appendix A.1 (EMA codebook updates), as implemented in
Sonnet 2 `snt.nets.VectorQuantizer` / `VectorQuantizerEMA`. The autoencoder around the quantiser
reuses the LDM `Encoder` / `Decoder` from `genjax.models.vae`, as VQGAN and LDM's `VQModel` do.

Shapes: encoder outputs `z (..., D)` channels-last; the codebook is `(K, D)` (K codes of width D);
indices are int32 `(...)` in [0, K).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.parallel.axes import EMBED, VOCAB

Dtype = Any


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code in squared L2 distance.

    Args:
      z: `(..., D)` float vectors.
      codebook: `(K, D)` float codes.

    Returns:
      int32 `(...)` in [0, K): `argmin_k ||z - e_k||^2` (ties go to the lowest k), computed in
      float32 as `||z||^2 - 2 z.e_k + ||e_k||^2` (van den Oord et al. 2017, eq. 1).
    """
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    d = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, e)
         + jnp.sum(e * e, -1))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def perplexity(indices: jax.Array, num_codes: int) -> jax.Array:
    """Code-usage perplexity `exp(-sum_k p_k log p_k)` of the average one-hot usage `p`.

    Equals K when all K codes are used equally often and 1 when one code is used for everything
    (Sonnet `VectorQuantizer`, output "perplexity"). Returns a float32 scalar.
    """
    p = jnp.mean(jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32), axis=0)
    return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-10)))


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantiser (VQ-VAE bottleneck), optionally with EMA codebook updates.

    Call: `z_q, indices, aux = vq.apply(variables, z, train=...)`.
      z: `(..., D)` encoder output, any float dtype. D must equal `code_dim`.
      z_q: `(..., D)` in `z.dtype`, the nearest codes, with straight-through gradients
        `z + stop_gradient(e - z)` (d z_q / d z = identity).
      indices: int32 `(...)` in [0, num_codes).
      aux: dict of float32 scalars `loss`, `codebook_loss` = mean ||sg[z] - e||^2,
        `commitment_loss` = mean ||z - sg[e]||^2, `perplexity`, and `counts` (num_codes,) int32
        (how often each code was picked in this batch, for `restart_dead_codes`).
        `loss = codebook_loss + beta * commitment_loss` (van den Oord et al. 2017, eq. 3, with
        means over all elements as Sonnet); with `use_ema` the codebook gets no gradient and
        `loss = beta * commitment_loss` (Appendix A.1).

    Variables:
      without `use_ema`: params `codebook (K, D)`.
      with `use_ema`: collection "vq_stats" holding `codebook (K, D)`, `ema_cluster_size_hidden
        (K,)`, `ema_dw_hidden (K, D)`, `counter ()` — no params. With `train=True` the statistics
        are updated (Sonnet 2 `VectorQuantizerEMA`: zero-debiased moving averages, Laplace-
        smoothed cluster sizes), so training calls `apply(..., train=True, mutable=["vq_stats"])`.
        The outputs of a step use the codebook from before that step's update, as Sonnet.

    Raises:
      UserError: the last axis of `z` is not `code_dim` (checked before tracing).
    """

    num_codes: int
    code_dim: int
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _codebook_init(self):
        # Sonnet: variance_scaling uniform with fan_in = D.
        return nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=-1, out_axis=-2)

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False):
        check(z.shape[-1] == self.code_dim, "z.shape[-1]", z.shape[-1],
              f"must equal code_dim={self.code_dim}")
        K, D = self.num_codes, self.code_dim
        if self.use_ema:
            codebook_var = self.variable(
                "vq_stats", "codebook",
                lambda: self._codebook_init()(self.make_rng("params"), (K, D), self.param_dtype))
            cs_hidden = self.variable("vq_stats", "ema_cluster_size_hidden", jnp.zeros, (K,), jnp.float32)
            dw_hidden = self.variable("vq_stats", "ema_dw_hidden", jnp.zeros, (K, D), jnp.float32)
            counter = self.variable("vq_stats", "counter", jnp.zeros, (), jnp.int32)
            codebook = jax.lax.stop_gradient(codebook_var.value)
        else:
            codebook = self.param(
                "codebook", nn.with_logical_partitioning(self._codebook_init(), (VOCAB, EMBED)),
                (K, D), self.param_dtype)

        indices = nearest_code(z, codebook)
        e = jnp.take(codebook, indices, axis=0).astype(jnp.float32)
        zf = z.astype(jnp.float32)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zf) - e))
        commitment_loss = jnp.mean(jnp.square(zf - jax.lax.stop_gradient(e)))
        counts = jnp.sum(jax.nn.one_hot(indices.reshape(-1), K, dtype=jnp.int32), axis=0)
        if self.use_ema:
            loss = self.beta * commitment_loss
            if train and not self.is_initializing():
                flat = zf.reshape(-1, D)
                one_hot = jax.nn.one_hot(indices.reshape(-1), K, dtype=jnp.float32)
                counter.value = counter.value + 1
                decay = self.ema_decay
                debias = 1.0 - decay ** counter.value.astype(jnp.float32)
                cs_hidden.value = cs_hidden.value - (cs_hidden.value - one_hot.sum(0)) * (1 - decay)
                dw_hidden.value = dw_hidden.value - (dw_hidden.value - one_hot.T @ flat) * (1 - decay)
                cluster_size = cs_hidden.value / debias
                dw = dw_hidden.value / debias
                n = jnp.sum(cluster_size)
                cluster_size = (cluster_size + self.epsilon) / (n + K * self.epsilon) * n
                codebook_var.value = (dw / cluster_size[:, None]).astype(self.param_dtype)
        else:
            loss = codebook_loss + self.beta * commitment_loss
        z_q = (zf + jax.lax.stop_gradient(e - zf)).astype(z.dtype)
        aux = {"loss": loss, "codebook_loss": codebook_loss, "commitment_loss": commitment_loss,
               "perplexity": perplexity(indices, K), "counts": counts}
        return z_q, indices, aux

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for int `indices (...)` in [0, K) -> `(..., D)` in `self.dtype`."""
        if self.use_ema:
            codebook = self.get_variable("vq_stats", "codebook")
        else:
            codebook = nn.unbox(self.get_variable("params", "codebook"))
        return jnp.take(codebook, indices, axis=0).astype(self.dtype)


def restart_dead_codes(codebook: jax.Array, usage_counts: jax.Array, z_batch: jax.Array,
                       rng: jax.Array, threshold: float = 1.0) -> jax.Array:
    """Replace rarely used codes by random encoder outputs (dead-code restarts).

    Codes whose `usage_counts` are below `threshold` are replaced by vectors drawn uniformly (with
    replacement) from the rows of `z_batch`; the other codes are returned unchanged. A trainer
    accumulates `aux["counts"]` from `VectorQuantizer` over a window of steps (or keeps an EMA of
    them), then calls this on the params' (or, with EMA, the "vq_stats") codebook. Source: the
    codebook-reset trick of Dhariwal et al. 2020 (Jukebox, Sec. 3.2) and Williams et al. 2020.
    With EMA codebooks also reset the restarted codes' EMA statistics (or they drift back).

    Args:
      codebook: `(K, D)` float.
      usage_counts: `(K,)` numeric, how often each code was used recently.
      z_batch: `(..., D)` recent encoder outputs (flattened to `(N, D)`).
      rng: PRNG key.
      threshold: codes with `usage_counts < threshold` are dead.

    Returns:
      `(K, D)` new codebook in `codebook.dtype`.
    """
    flat = z_batch.reshape(-1, codebook.shape[-1])
    pick = jax.random.randint(rng, (codebook.shape[0],), 0, flat.shape[0])
    dead = usage_counts < threshold
    return jnp.where(dead[:, None], flat[pick].astype(codebook.dtype), codebook)
