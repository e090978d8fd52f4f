"""DALL·E's transformer (`genjax.models.dalle`): exact causality by gradients, and token-by-token
sampling (`dalle.generate`) against teacher forcing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.models import dalle, token_sampling

LT, GRID, K = 4, (2, 3), 11
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def model():
    m = dalle.Model(text_vocab_size=7, text_length=LT, num_codes=K, image_grid=GRID, hidden_size=16, depth=2,
                    num_heads=2)
    text = jax.random.randint(jax.random.PRNGKey(0), (2, LT), 0, 7)
    image = jax.random.randint(jax.random.PRNGKey(1), (2, N), 0, K)
    return m, jax.jit(m.init)(jax.random.PRNGKey(2), text, image), text, image


def test_logits_depend_only_on_earlier_positions(model):
    """d image_logits[:, i] / d x[:, j] (x the input embeddings, `embed`) is exactly 0 for every
    position j > LT - 1 + i (the position that predicts image token i) and nonzero at j = LT - 1 + i
    and at the text; likewise text logit t reads positions <= t only."""
    m, v, text, image = model
    x = m.apply(v, text, image, method=m.embed)
    assert x.shape == (2, LT + N - 1, 16)
    w_img = jax.random.normal(jax.random.PRNGKey(3), (K,))
    w_txt = jax.random.normal(jax.random.PRNGKey(4), (7,))

    @jax.jit
    def jacobians(x):  # (outputs, S): |d logits[0, out] . w / d x[0, j]| summed over the embedding width
        def f(x):
            text_logits, image_logits = m.apply(v, x, method=m.backbone)
            return jnp.concatenate([image_logits[0] @ w_img, text_logits[0] @ w_txt])
        return jnp.abs(jax.jacrev(f)(x)[:, 0]).sum(-1)

    j = np.asarray(jacobians(x))
    image_jac, text_jac = j[:N], j[N:]
    for rows, first in ((image_jac, LT - 1), (text_jac, 0)):
        for i, row in enumerate(rows):
            assert np.all(row[first + i + 1:] == 0), (i, row)
            assert row[first + i] > 0 and row[0] > 0


def test_sampling_draws_from_the_teacher_forced_logits(model):
    """`generate`'s token i is drawn from the logits that teacher forcing on the drawn tokens gives
    at i: with top_k=1 it is their argmax; with temperature 0.7, top-p 0.9 and guidance 2 it equals
    `sample_logits(fold_in(rng, i), cfg_logits(cond, uncond, 2), ...)` recomputed step by step."""
    m, v, text, _ = model
    fn = jax.jit(lambda t, i: m.apply(v, t, i)[1])
    rng = jax.random.PRNGKey(5)
    greedy = jax.jit(lambda r: dalle.generate(fn, text, r, num_tokens=N, top_k=1))(rng)
    np.testing.assert_array_equal(greedy, jnp.argmax(fn(text, greedy), -1))
    null = jnp.zeros_like(text)
    drawn = jax.jit(lambda r: dalle.generate(fn, text, r, num_tokens=N, temperature=0.7, top_p=0.9,
                                             null_text_ids=null, cfg_scale=2.0))(rng)
    cond, uncond = fn(text, drawn), fn(null, drawn)
    for i in range(N):
        logits = token_sampling.cfg_logits(cond[:, i], uncond[:, i], 2.0)
        expect = token_sampling.sample_logits(jax.random.fold_in(rng, i), logits, temperature=0.7, top_p=0.9)
        np.testing.assert_array_equal(drawn[:, i], expect)
    assert not np.array_equal(drawn, greedy)
