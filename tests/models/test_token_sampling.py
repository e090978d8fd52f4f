"""Token sampling against transformers' logits warpers (the reference), plus the draw itself."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from genjax.errors import UserError
from genjax.models import token_sampling

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def _reference(logits, temperature, top_k, top_p):
    x = torch.tensor(logits)
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long)
    x = logits_process.TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = logits_process.TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = logits_process.TopPLogitsWarper(top_p)(ids, x)
    return x.numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9),
                                                       (1.0, 10, 0.5), (0.5, 3, 0.05)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 37)).astype(np.float32) * 3
    logits[0, :4] = logits[0, 4]  # ties at the cut
    ours = np.asarray(token_sampling.filter_logits(jnp.asarray(logits), temperature=temperature,
                                                    top_k=top_k, top_p=top_p))
    ref = _reference(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    draws = token_sampling.sample_logits(jax.random.key(0), jnp.broadcast_to(logits, (20000, 4)), top_k=2)
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    assert draws.dtype == jnp.int32


def test_cfg_scale_one_is_the_conditional_model_and_bad_settings_are_refused():
    cond, uncond = jnp.asarray([1.0, 2.0]), jnp.asarray([0.0, 5.0])
    np.testing.assert_allclose(token_sampling.cfg_logits(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(token_sampling.cfg_logits(cond, uncond, 3.0), [3.0, -4.0])
    for kw, field in [(dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
                      (dict(top_k=5), "top_k"), (dict(top_p=0.0), "top_p")]:
        with pytest.raises(UserError, match=field):
            token_sampling.filter_logits(jnp.zeros((2, 4)), **kw)
