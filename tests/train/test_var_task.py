"""Task "var": sampling consistency (the logits each scale is drawn from during next-scale sampling
equal the teacher-forced logits of the drawn tokens, guided with the CFG ramp), and end to
end (slow): multi-scale VQ-VAE smoke run -> VAR smoke run through `trainer.main` -> `genjax
sample --class-label` writes the npz and PNG."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import cli
from genjax.config import load_config
from genjax.models import token_sampling, var, vqvae
from genjax.tasks import var as var_task
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALES = (1, 2, 4)


def _models():
    vq = vqvae.VQVAE(in_channels=1, out_channels=1, block_out_channels=(4, 8), norm_num_groups=4,
                     mid_block_attention=False, latent_channels=3, num_codes=16, scales=SCALES)
    # only the quantizer is used: initialise it alone (setup modules are built lazily)
    vq_vars = jax.jit(lambda: nn.unbox(vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)),
                                               method=lambda m, z: m.quantizer(z))))()
    model = var.VAR(scales=SCALES, vocab_size=16, code_dim=3, num_classes=10, hidden_size=16, depth=2, num_heads=2)
    # random weights everywhere (no zero-initialised gates and head), so the logits vary; jitted: one compile
    params = jax.jit(lambda: jax.tree.map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
        nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 20, 3)))["params"])))()
    return vq, vq_vars, model, params


def test_sampled_logits_equal_teacher_forced_logits():
    vq, vq_vars, model, params = _models()
    labels = jnp.array([3, 7, 0])
    bounds = np.cumsum([0] + [s * s for s in SCALES])

    @jax.jit
    def forced(tokens, y):
        x_in = var_task._quant(vq, vq_vars, "var_input", tokens)
        return model.apply({"params": params}, y, x_in), var_task._quant(vq, vq_vars, "f_hat", tokens)

    # guided with the ramp 1 -> 3: scale 1's logits are the conditional ones, the others mixed
    tokens, f_hat, logits = jax.jit(var_task.generate, static_argnums=(0, 2), static_argnames=("guided", "cfg_ramp"))(
        model, params, vq, vq_vars, jax.random.PRNGKey(5), labels, 3.0, guided=True, cfg_ramp=True)
    cond, f_hat_forced = forced(tokens, labels)
    uncond = forced(tokens, jnp.full_like(labels, 10))[0]
    for k in range(len(SCALES)):
        part = slice(bounds[k], bounds[k + 1])
        want = token_sampling.cfg_logits(cond[:, part], uncond[:, part], 1 + k)
        np.testing.assert_allclose(np.asarray(logits[k]), np.asarray(want), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(f_hat), np.asarray(f_hat_forced), atol=1e-5)
    assert len(np.unique(np.asarray(tokens))) > 3  # the draws are not degenerate


@pytest.mark.slow  # ~4 min on the loaded 2-core CPU: two smoke trainings and their compiles
def test_var_trains_end_to_end_and_samples_a_class(tmp_path):
    vq_dir, var_dir = str(tmp_path / "vq"), str(tmp_path / "var")
    trainer.main(load_config(os.path.join(ROOT, "configs", "vqvae_mnist.py") + ":smoke=True,var_tokenizer=True",
                             ["--config.mesh.data=1", "--config.eval.sample_every_steps=0"]), vq_dir,
                 devices=jax.devices()[:1])
    trainer.main(load_config(os.path.join(ROOT, "configs", "var_mnist.py") + f":smoke=True,vqvae={vq_dir}",
                             ["--config.mesh.data=1"]), var_dir, devices=jax.devices()[:1])
    with open(os.path.join(var_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    np.testing.assert_allclose(steps[0]["loss"], np.log(32), rtol=1e-4)  # zero-initialised head: uniform
    assert {"accuracy", "loss_1", "loss_4"} <= set(steps[0])
    evals = [r for r in records if "digit_accuracy" in r]
    assert len(evals) == 1 and 0 <= evals[0]["digit_accuracy"] <= 1 and 0 <= evals[0]["digit_accuracy_nocfg"] <= 1
    assert os.path.isfile(os.path.join(var_dir, "samples", "step_000004.png"))
    out = str(tmp_path / "threes.npz")
    assert cli.main(["sample", "--workdir", var_dir, "--class-label", "3", "--num", "2", "--out", out]) == 0
    with np.load(out) as z:
        images = next(z[k] for k in z.files if z[k].dtype == np.uint8)
    assert images.shape == (2, 16, 16, 1)
    assert os.path.isfile(str(tmp_path / "threes.png"))
