"""Adversarial training of autoencoders: PatchGAN discriminator, hinge and generator losses, adaptive weight.

Sources: Isola et al. 2017 (pix2pix PatchGAN); Esser et al. 2021, "Taming Transformers", eq. 4-7,
as implemented in taming-transformers / LDM `NLayerDiscriminator` and `LPIPSWithDiscriminator`;
Lim & Ye 2017 (hinge loss). Images are `(B, H, W, C)` float in [-1, 1]; used with the
reconstruction + KL loss `genjax.models.vae.vae_loss`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.parallel.axes import CONV_IN, CONV_OUT

Dtype = Any


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017; taming / LDM `NLayerDiscriminator`).

    conv4x4/2 (ndf) -> LeakyReLU(0.2) -> n_layers-1 x [conv4x4/2, BatchNorm, LeakyReLU] ->
    conv4x4/1, BatchNorm, LeakyReLU -> conv4x4/1 (1 channel); widths ndf * min(2**n, 8), all
    convs padded by 1, no conv bias before a BatchNorm; weights N(0, 0.02), BatchNorm scale
    N(1, 0.02) as taming's `weights_init`. With n_layers=3 each logit sees a 70x70 patch and a
    256x256 image gives 30x30 logits.

    Call: `(x (B, H, W, C) in [-1, 1], *, train: bool) -> logits (B, H', W', 1)` in `dtype`.
    BatchNorm keeps running statistics in the "batch_stats" collection: train with
    `apply(..., train=True, mutable=["batch_stats"])` (torch BatchNorm2d momentum 0.1 = Flax 0.9).
    """
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, CONV_IN, CONV_OUT))

        def conv(features, stride, bias, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=bias, kernel_init=init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)

        def norm(h, name):
            bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              dtype=jnp.float32, param_dtype=self.param_dtype, name=name,
                              scale_init=lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d))
            return bn(h.astype(jnp.float32)).astype(self.dtype)

        h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = conv(self.ndf * min(2 ** n, 8), stride, False, f"conv_{n}")(h)
            h = nn.leaky_relu(norm(h, f"norm_{n}"), 0.2)
        return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)


def discriminator_hinge_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Hinge loss `0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))` (taming `hinge_d_loss`;
    Lim & Ye 2017). Float32 scalar; logits of any matching shapes."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """Generator's adversarial loss `-mean(D(G(z)))` (taming `LPIPSWithDiscriminator`). Float32 scalar."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_disc_weight(nll_grads_norm: jax.Array, g_grads_norm: jax.Array, *,
                         disc_weight: float = 1.0) -> jax.Array:
    """Adaptive weight of the GAN term: `clip(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight`,
    without gradient (Esser et al. 2021, eq. 7; taming `calculate_adaptive_weight`).

    The norms are of the gradients of the nll (`vae.vae_loss`) and of `generator_loss` with respect to
    the decoder's last layer (`params["decoder"]["conv_out"]["kernel"]`). A trainer gets both with
    one `jax.grad` each of a function of that kernel alone, e.g.
    `jax.grad(lambda k: nll_of(set_conv_out_kernel(params, k)))(kernel)`, then takes
    `jnp.linalg.norm` of each. Returns a float32 scalar.
    """
    w = jnp.asarray(nll_grads_norm, jnp.float32) / (jnp.asarray(g_grads_norm, jnp.float32) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)
