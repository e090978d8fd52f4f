"""VQ-VAE: nearest-code vector quantiser with straight-through gradients.

Source: van den Oord, Vinyals, Kavukcuoglu 2017, "Neural Discrete Representation Learning"
(arXiv:1711.00937), eq. 3 (loss) and Appendix A.1 (EMA codebook updates), as implemented in
Sonnet 2 `snt.nets.VectorQuantizer` / `VectorQuantizerEMA`. The autoencoder around the quantiser
reuses the LDM `Encoder` / `Decoder` from `genjax.models.ldm_autoencoder`, as VQGAN and LDM's `VQModel` do.

`load_diffusers` reads diffusers `VQModel` checkpoints (e.g. the `vqvae/` of
CompVis/ldm-super-resolution-4x-openimages). Shapes: encoder outputs `z (..., D)` channels-last; the codebook is `(K, D)` (K codes of width D);
indices are int32 `(...)` in [0, K).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.io.weights import StateDictReader, check_overrides, check_params_match, load_state_dict
from genjax.models.conv import conv2d
from genjax.models.ldm_autoencoder import (Decoder, Encoder, autoencoder_config, check_image, coder_kwargs,
                                           load_decoder, load_encoder)
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
      UserError: the last axis of `z` is not `code_dim` (checked before compiling).
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


def ema_usage(stats: dict[str, jax.Array], decay: float) -> jax.Array:
    """Recent use of each code of an EMA quantiser: its zero-debiased EMA cluster size
    `ema_cluster_size_hidden / (1 - decay ** counter)` (Sonnet 2 `VectorQuantizerEMA`), i.e. an
    exponential average of how many of a batch's vectors picked it. `stats`: one `VectorQuantizer`'s
    "vq_stats" (after at least one training step). Returns float32 `(K,)`."""
    debias = 1.0 - jnp.float32(decay) ** stats["counter"].astype(jnp.float32)
    return stats["ema_cluster_size_hidden"] / debias


def restart_ema_codes(stats: dict[str, jax.Array], z_batch: jax.Array, rng: jax.Array, *,
                      threshold: float, decay: float) -> tuple[dict[str, jax.Array], jax.Array]:
    """Dead-code restarts for an EMA codebook (Dhariwal et al. 2020, Jukebox, Sec. 3.2 and its
    `vqvae/bottleneck.py`: codes whose EMA usage falls below a threshold are set to random
    encoder outputs of the current batch).

    The dead codes are those with `ema_usage(stats, decay) < threshold`; each gets a row of
    `z_batch` drawn uniformly with replacement (`restart_dead_codes`), and its EMA statistics are
    reset so that the debiased usage is `threshold` and the debiased sum is `threshold * code`:
    the next EMA update starts from the new code, and a restarted code that no vector picks is
    restarted again at the next step (its usage decays below `threshold`), as Jukebox's
    `k_elem = 1`, `k_sum = k_rand` with threshold 1. `counter` is kept. Call it after the step's
    EMA update, with that step's encoder outputs.

    Args:
      stats: one `VectorQuantizer`'s "vq_stats": codebook `(K, D)`, ema_cluster_size_hidden `(K,)`,
        ema_dw_hidden `(K, D)`, counter `()`.
      z_batch: `(..., D)` the encoder outputs of the batch.
      rng: PRNG key (the step's).
      threshold: > 0 in vectors per batch (Jukebox: 1.0).
      decay: the quantiser's `ema_decay`.

    Returns:
      (new stats, dead): the stats with the dead codes restarted, and the bool `(K,)` mask of them.
    """
    usage = ema_usage(stats, decay)
    dead = usage < threshold
    codebook = restart_dead_codes(stats["codebook"], usage, z_batch, rng, threshold)
    scale = jnp.float32(threshold) * (1.0 - jnp.float32(decay) ** stats["counter"].astype(jnp.float32))
    new = dict(stats, codebook=codebook,
               ema_cluster_size_hidden=jnp.where(dead, scale, stats["ema_cluster_size_hidden"]),
               ema_dw_hidden=jnp.where(dead[:, None], scale * codebook.astype(jnp.float32),
                                       stats["ema_dw_hidden"]))
    return new, dead


class VQVAE(nn.Module):
    """Vector-quantised autoencoder: encoder -> quant_conv -> quantiser -> post_quant_conv -> decoder.

    The encoder / decoder are the LDM ones (`genjax.models.ldm_autoencoder.Encoder` / `Decoder`, single `z`),
    as VQGAN (Esser et al. 2021) and LDM / diffusers `VQModel`; the bottleneck is
    `VectorQuantizer` (van den Oord et al. 2017).

    Methods (`module.apply(variables, ..., method=...)`):
      encode(x (B, H, W, in_channels) in [-1, 1], *, train=False) -> (z_q, indices, aux):
        z_q `(B, H/f, W/f, latent_channels)` with straight-through gradients, indices int32
        `(B, H/f, W/f)`, aux the quantiser's losses and metrics (see `VectorQuantizer`);
        f = 2 ** (len(block_out_channels) - 1).
      decode(z_q) -> (B, H, W, out_channels), about [-1, 1].
      decode_indices(indices (B, h, w) int in [0, num_codes); (B, L) with scales) -> (B, h*f, w*f, out_channels).
      __call__(x, *, train=False) -> (recon, indices, aux).
    With `use_ema`, training calls `apply(..., train=True, mutable=["vq_stats"])`. The training
    loss is `rec(x, recon) + aux["loss"]` (eq. 3). Outputs in `dtype`.
    attention_impl: the mid-block attention's implementation (`attention.dot_product_attention`).
    scales: None (the single-scale `VectorQuantizer`), or VAR's token-map sides s_1 < ... < s_K
      with s_K = H / f: the bottleneck is then `var.MultiScaleQuantizer` (Tian et al. 2024, VAR's
      `VectorQuantizer2`; phi mixing ratio `quant_resi`, `num_phi` shared phi convs), indices are
      int32 `(B, L)`, L = sum s_k^2 (scale by scale), and `decode_indices` takes them. Its
      codebook is a parameter (no `use_ema`).

    Raises:
      UserError: x not 4-D, wrong channel count, H or W not divisible by f, with `scales`: H / f
        not s_K, or `use_ema` (before compiling).
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 3
    num_codes: int = 256
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    attention_impl: str = "auto"
    scales: tuple[int, ...] | None = None
    quant_resi: float = 0.5
    num_phi: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = coder_kwargs(self)
        self.encoder = Encoder(self.latent_channels, double_z=False, **kw)
        self.decoder = Decoder(self.out_channels, **kw)
        ckw = dict(padding=0, dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = conv2d(self.latent_channels, 1, **ckw)
        self.post_quant_conv = conv2d(self.latent_channels, 1, **ckw)
        if self.scales is None:
            self.quantizer = VectorQuantizer(self.num_codes, self.latent_channels, beta=self.beta,
                                             use_ema=self.use_ema, ema_decay=self.ema_decay,
                                             dtype=self.dtype, param_dtype=self.param_dtype)
        else:
            from genjax.models.var import MultiScaleQuantizer

            check(not self.use_ema, "use_ema", True, "the multi-scale quantizer (scales) has no EMA codebook")
            check(list(self.scales) == sorted(set(self.scales)), "scales", self.scales,
                  "must be strictly increasing sides, the last one the latent side")
            self.quantizer = MultiScaleQuantizer(self.num_codes, self.latent_channels, tuple(self.scales),
                                                 beta=self.beta, quant_resi=self.quant_resi, num_phi=self.num_phi,
                                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def encode(self, x: jax.Array, *, train: bool = False):
        check_image(x, self.in_channels, self.downsample_factor)
        return self.quantizer(self.quant_conv(self.encoder(x)), train=train)

    def decode(self, z_q: jax.Array) -> jax.Array:
        check(z_q.ndim == 4 and z_q.shape[-1] == self.latent_channels, "z_q.shape", tuple(z_q.shape),
              f"must be (B, h, w, {self.latent_channels}) (latent_channels)")
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype)))

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        if self.scales is not None:  # (B, L) tokens of all scales
            return self.decode(self.quantizer.f_hat(indices))
        check(indices.ndim == 3, "indices.shape", tuple(indices.shape), "must be (B, h, w)")
        return self.decode(self.quantizer.lookup(indices))

    def __call__(self, x: jax.Array, *, train: bool = False):
        z_q, indices, aux = self.encode(x, train=train)
        return self.decode(z_q), indices, aux


VARIANTS: dict[str, dict[str, Any]] = {
    # The f=4 VQ autoencoder of LDM (CompVis vq-f4; diffusers VQModel in
    # CompVis/ldm-super-resolution-4x-openimages): 8192 codes of width 3.
    "ldm-f4": dict(block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
                   num_codes=8192, norm_num_groups=32),
    # A small f=4 model for 28x28 / 32x32 single-channel digits.
    "mnist": dict(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                  layers_per_block=1, latent_channels=8, num_codes=128, norm_num_groups=16),
}


def Model(*, variant: str | None = None, **kw: Any) -> VQVAE:
    """`VQVAE` from a named variant (see `VARIANTS`), updated with `kw`. UserError for an unknown variant."""
    check(variant is None or variant in VARIANTS, "variant", variant,
          f"must be one of {sorted(VARIANTS)}")
    return VQVAE(**{**(VARIANTS[variant] if variant else {}), **kw})


_CONFIG_KEYS = {  # diffusers VQModel config.json -> VQVAE attribute
    "in_channels": "in_channels", "out_channels": "out_channels",
    "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
    "latent_channels": "latent_channels", "norm_num_groups": "norm_num_groups",
    "mid_block_add_attention": "mid_block_attention", "num_vq_embeddings": "num_codes",
}


def load_diffusers(src: Any, **overrides: Any) -> tuple[VQVAE, dict[str, Any]]:
    """Build a `VQVAE` and its params from a diffusers `VQModel` checkpoint.

    Args:
      src: a diffusers model folder, a `.safetensors` file, or a `{key: array}` dict (then the
        hyper-parameters come from the shapes, and `norm_num_groups` is 32 unless overridden).
      **overrides: `VQVAE` attributes replacing the config's (e.g. dtype, use_ema=False).

    Returns:
      (module, params): plain float32 jax arrays in the tree of `nn.unbox(init(...)["params"])`
      (the codebook is `params["quantizer"]["codebook"]`, diffusers `quantize.embedding.weight`).
      Codes, indices and decoder output match diffusers 0.42 `VQModel` (tests/models/test_vqvae.py).

    Raises:
      UserError: missing / extra keys or shapes that do not fit, `vq_embed_dim` other than
        `latent_channels`, `norm_type` other than "group", `use_ema=True` (a VQModel codebook is
        a parameter), unknown overrides.
    """
    state, config = load_state_dict(src)
    r = StateDictReader(state, "VQModel")
    check_overrides(VQVAE, overrides)
    kw = autoencoder_config(r, config, _CONFIG_KEYS)
    if config:
        check(config.get("norm_type", "group") == "group", "config.norm_type", config.get("norm_type"),
              'must be "group"')
        check(config.get("vq_embed_dim") in (None, kw.get("latent_channels", 3)), "config.vq_embed_dim",
              config.get("vq_embed_dim"), "must be null or equal latent_channels")
    else:
        kw["num_codes"] = int(r.get("quantize.embedding.weight").shape[0])
    module = VQVAE(**{**kw, **overrides})
    check(not module.use_ema, "use_ema", True, "VQModel checkpoints hold the codebook as a parameter")
    params = {"encoder": load_encoder(r, "encoder", module), "decoder": load_decoder(r, "decoder", module),
              "quant_conv": r.conv("quant_conv"), "post_quant_conv": r.conv("post_quant_conv"),
              "quantizer": {"codebook": r.get("quantize.embedding.weight")}}
    r.finish()
    f = module.downsample_factor
    check_params_match(module, params, jnp.zeros((1, f, f, module.in_channels)), family="VQModel")
    return module, jax.tree.map(jnp.asarray, params)
