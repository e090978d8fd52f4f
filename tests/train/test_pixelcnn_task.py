"""Task "pixelcnn": the loss is the Bernoulli NLL of the thresholded digits (numpy), the sampler
draws every pixel from the model's own conditional (redrawn from the full forward with the same
keys it gives the same image), and end to end through `trainer.main` and
`genjax sample` (smoke config). Its config errors are rows of tests/bad_inputs/config.py."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import cli, tasks
from genjax.config import load_config
from genjax.data import recipes
from genjax.errors import UserError
from genjax.models import pixelcnn
from genjax.models.token_sampling import sample_logits
from genjax.tasks import pixelcnn as pixelcnn_task
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_of(*overrides):
    return load_config(os.path.join(ROOT, "configs", "pixelcnn_mnist.py") + ":smoke=True",
                       ["--config.mesh.data=1", *overrides])


def test_loss_is_the_bernoulli_nll_of_digits_thresholded_at_127():
    config = config_of()
    task = tasks.build(config)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    batch = recipes.fixed_examples(config, 8, split="train")
    loss, metrics = jax.jit(task.loss_fn)(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(1))
    uint8 = np.round((batch["image"][..., 0].astype(np.float64) + 1) * 127.5)
    bits = uint8 > 127
    assert 0.05 < bits.mean() < 0.5  # ink and background both present
    logits = np.asarray(task.module.apply({"params": params}, jnp.asarray(bits[..., None], jnp.float32),
                                          jnp.asarray(batch["label"])), np.float64)
    p = 1 / (1 + np.exp(-logits))
    expect = np.mean(-np.sum(np.where(bits, np.log(p), np.log(1 - p)), axis=(1, 2)))
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bits_per_dim"]), expect / (784 * math.log(2)), rtol=1e-5)
    with pytest.raises(UserError, match="cfg_scale"):  # refused before anything compiles
        task.sample_fn(params, jax.random.PRNGKey(0), [3], cfg_scale=2.0)
    with pytest.raises(UserError, match="labels"):
        task.sample_fn(params, jax.random.PRNGKey(0), [10])


def test_sampler_draws_each_pixel_from_the_models_conditional():
    """Every pixel of a sample, redrawn with its key (`fold_in(rng, pixel index)`) from the full
    forward's logit on the finished image at the same temperature, comes out the same: the row-
    cached sampler uses exactly the model's conditionals p(x_i | x_<i, y)."""
    model = pixelcnn.Model(variant="tiny")
    h, w, labels, t = 6, 7, jnp.array([0, 3, 9]), 0.7
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 1)), labels[:1])["params"]
    rng = jax.random.PRNGKey(3)
    x = jax.jit(lambda rng: pixelcnn_task.sample(model, params, rng, labels, height=h, width=w, temperature=t))(rng)
    assert x.shape == (3, h, w, 1) and set(np.unique(x)) <= {0.0, 1.0} and 0 < float(x.mean()) < 1
    logits = jax.jit(model.apply)({"params": params}, x, labels).reshape(3, h * w)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(h * w))
    redraw = jax.vmap(lambda key, l: sample_logits(key, jnp.stack([jnp.zeros_like(l), l], -1), temperature=t),
                      (0, 1), 1)
    np.testing.assert_array_equal(np.asarray(redraw(keys, logits)).reshape(3, h, w), np.asarray(x[..., 0]))
    flipped = redraw(keys, -logits)  # the same keys on other conditionals give another image
    assert not np.array_equal(np.asarray(flipped).reshape(3, h, w), np.asarray(x[..., 0]))


def test_pixelcnn_trains_end_to_end_and_samples_through_the_cli(tmp_path):
    workdir = str(tmp_path / "pixelcnn")
    record = trainer.main(config_of("--config.num_steps=2", "--config.eval.sample_every_steps=2"), workdir,
                          devices=jax.devices()[:1])
    assert record["step"] == 2 and 0 < record["bits_per_dim"] <= 1.01
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "train_nll" in r]
    assert len(evals) == 1 and 300 < evals[0]["nll"] < 600 and 0 <= evals[0]["digit_accuracy"] <= 1
    np.testing.assert_allclose(evals[0]["bits_per_dim"], evals[0]["nll"] / (784 * math.log(2)))
    assert os.path.isfile(os.path.join(workdir, "samples", "step_000002.png"))
    out = str(tmp_path / "threes.npz")
    assert cli.main(["sample", "--workdir", workdir, "--class-label", "3", "--num", "2", "--out", out]) == 0
    with np.load(out) as f:
        images, labels = f["images"], f["class_labels"]
    assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8 and set(np.unique(images)) <= {0, 255}
    assert labels.tolist() == [3, 3] and os.path.isfile(str(tmp_path / "threes.png"))
