"""DALL·E's discrete VAE (`genjax.models.dvae`): the Gumbel-softmax path against the hard argmax
path, and the KL to the uniform prior against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from genjax.models import dvae

K = 16


def _model():
    """A small dVAE whose encoder's last conv is scaled by 100: confident logits, as a trained
    encoder's (the logits are linear in that layer's params)."""
    m = dvae.Model(in_channels=1, out_channels=1, block_out_channels=(8,), num_codes=K, code_dim=8,
                   norm_num_groups=4)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 1), minval=-1, maxval=1)
    v = jax.jit(m.init)(jax.random.PRNGKey(1), x)
    v = {"params": {**v["params"], "encoder": {**v["params"]["encoder"], "conv_out": jax.tree.map(
        lambda p: p * 100.0, v["params"]["encoder"]["conv_out"])}}}
    return m, v, x


def test_relaxed_path_equals_hard_path_at_low_temperature():
    """At tau = 0.01 the decoder output of the Gumbel-softmax path (`__call__`, noise from a fixed
    key, and without noise) equals the hard path's (`decode_codes` of argmax(logits + g), the same
    noise g; without noise the tokeniser's `encode`). Tolerance: softmax((l + g) / tau) differs
    from one_hot(argmax(l + g)) by at most 2 (K - 1) exp(-gap / tau) in L1, gap the margin of the
    top perturbed logit over the second at each position; the test asserts that bound < 1e-6, so
    the decoder outputs (size ~1) may differ by float32 rounding only (atol 1e-4). At tau = 1 the
    relaxed output differs from the hard one (the comparison can fail)."""
    m, v, x = _model()
    tau, rng = 0.01, jax.random.PRNGKey(2)

    @jax.jit
    def paths(v, x):  # one compiled program: the model's paths (eager dispatch is slow on CPU)
        logits = m.apply(v, x, method=m.logits)
        perturbed = jnp.stack([logits + jax.random.gumbel(rng, logits.shape, jnp.float32), logits])
        codes = jnp.argmax(perturbed, -1)
        hard = m.apply(v, codes.reshape(-1, *codes.shape[2:]), method=m.decode_codes).reshape(2, *x.shape)
        relaxed = [m.apply(v, x, tau, key) for key in (rng, None)]
        warm = m.apply(v, dvae.gumbel_softmax(logits * 0.01, 1.0, rng), method=m.decode_soft)
        return logits, perturbed, codes, m.apply(v, x, method=m.encode), hard, relaxed, warm

    logits, perturbed, codes, tokens, hard, relaxed, warm = paths(v, x)
    top2 = jnp.sort(perturbed, axis=-1)[..., -2:]
    bound = 2 * (K - 1) * float(jnp.exp(-jnp.min(top2[..., 1] - top2[..., 0]) / tau))
    assert bound < 1e-6
    np.testing.assert_array_equal(codes[1], tokens)
    for i, key in enumerate((rng, None)):
        soft = dvae.gumbel_softmax(logits, tau, key)
        assert float(jnp.abs(soft - dvae.hard_one_hot(perturbed[i])).sum(-1).max()) <= bound
        np.testing.assert_array_equal(relaxed[i][1], logits)
        np.testing.assert_allclose(relaxed[i][0], hard[i], atol=1e-4)
    assert float(jnp.abs(warm - hard[0]).max()) > 1e-2


def test_kl_to_uniform_matches_numpy():
    """KL(softmax(l) || U(K)) = sum q log q + log K per position (nats), as numpy in float64; 0 for
    equal logits, -> log K for a one-hot posterior."""
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 3, 3, K))) * 3
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    expect = (q * np.log(q)).sum(-1) + np.log(K)
    np.testing.assert_allclose(dvae.kl_to_uniform(jnp.asarray(logits)), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dvae.kl_to_uniform(jnp.zeros((4, K))), 0.0, atol=1e-6)
    np.testing.assert_allclose(dvae.kl_to_uniform(jnp.eye(K) * 100.0), np.log(K), rtol=1e-5)
