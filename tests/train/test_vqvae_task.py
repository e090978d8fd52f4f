"""Task "vqvae": the EMA codebook step against numpy (Sonnet 2 `VectorQuantizerEMA`, van den Oord
et al. 2017 App. A.1), dead-code restarts of exactly the unused codes, the loss-trained codebook
(eq. 3), and end to end through `trainer.main` (smoke config): logs, reconstructions, held-out
PSNR / SSIM / perplexity, restore, and (slow) resume == uninterrupted with the EMA state."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import tasks
from genjax.config import load_config
from genjax.data import recipes
from genjax.io import media
from genjax.tasks import vqvae as vqvae_task
from genjax.train import trainer
from genjax.train.state import MODEL_STATE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_of(arg="", *overrides):
    return load_config(os.path.join(ROOT, "configs", "vqvae_mnist.py") + f":smoke=True{arg}",
                       ["--config.mesh.data=1", *overrides])


def _sonnet_step(codebook, z, cs_hidden, dw_hidden, t, decay=0.99, eps=1e-5):
    """One `VectorQuantizerEMA` training step in numpy float64 (codebook (K, D), z (N, D))."""
    K = codebook.shape[0]
    idx = ((z[:, None] - codebook) ** 2).sum(-1).argmin(-1)
    enc = np.eye(K)[idx]
    cs_hidden = cs_hidden - (cs_hidden - enc.sum(0)) * (1 - decay)
    dw_hidden = dw_hidden - (dw_hidden - enc.T @ z) * (1 - decay)
    cs, dw = cs_hidden / (1 - decay ** t), dw_hidden / (1 - decay ** t)
    n = cs.sum()
    return dw / ((cs + eps) / (n + K * eps) * n)[:, None], cs_hidden, dw_hidden, idx


def _step_inputs(config):
    task = tasks.build(config)
    key = jax.random.PRNGKey(0)
    params = task.init_params(key)
    state = {} if task.init_state is None else task.init_state(key)
    x = jnp.asarray(recipes.fixed_examples(config, 8, split="train")["image"])
    return task, jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(params)), state, x


@pytest.mark.slow  # ~10 s; fast counterparts: tests/models/test_vqvae.py (hand-made EMA batch, restarts)
def test_ema_step_follows_sonnet_and_restarts_exactly_the_unused_codes():
    """Two train steps of the task's loss_fn with the EMA codebook and restart threshold 0.5: the
    codebook is numpy's VectorQuantizerEMA update of the encoder outputs; after step 1 (debiased
    usage = the batch's counts) exactly the codes no vector picked are set to rows of z, with
    usage reset to the threshold; step 2 continues the EMA from those statistics. (A threshold
    between integers keeps every usage away from it by more than float32 rounding.)"""
    config = config_of(",codebook=ema,restart=0.5")
    task, params, state, x = _step_inputs(config)
    module = task.module
    forward = jax.jit(lambda v, x: module.apply(v, x, False, method=vqvae_task._forward)[1])
    loss_fn = jax.jit(task.loss_fn)
    stats = jax.tree.map(np.asarray, state["vq_stats"]["quantizer"])
    book = stats["codebook"].astype(np.float64)
    cs_h, dw_h = np.zeros(book.shape[0]), np.zeros(book.shape)
    for t in (1, 2):
        variables = {"params": params, "vq_stats": state["vq_stats"]}
        z = np.asarray(forward(variables, x), np.float64).reshape(-1, 4)
        loss, metrics = loss_fn({**params, **state}, {"image": x}, jax.random.PRNGKey(t))
        new = jax.tree.map(np.asarray, metrics[MODEL_STATE]["vq_stats"]["quantizer"])
        expect, cs_h, dw_h, idx = _sonnet_step(book, z, cs_h, dw_h, t)
        usage = cs_h / (1 - 0.99 ** t)
        dead = usage < 0.5
        if t == 1:
            np.testing.assert_array_equal(dead, np.bincount(idx, minlength=book.shape[0]) == 0)
            assert 0 < dead.sum() < len(dead)
        assert float(metrics["restarted"]) == dead.sum()
        np.testing.assert_allclose(new["codebook"][~dead], expect[~dead], rtol=1e-4, atol=1e-5)
        assert all(np.any(np.all(np.isclose(z, code, atol=1e-6), axis=1)) for code in new["codebook"][dead])
        np.testing.assert_allclose(new["ema_cluster_size_hidden"][dead] / (1 - 0.99 ** t), 0.5, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["perplexity"]),
                                   np.exp(-sum(p * np.log(p) for p in np.bincount(idx) / len(idx) if p > 0)),
                                   rtol=1e-4)
        np.testing.assert_allclose(float(loss), float(metrics["rec_loss"]) + 0.25 * float(metrics["commitment_loss"]),
                                   rtol=1e-6)
        book, cs_h, dw_h = new["codebook"].astype(np.float64), new["ema_cluster_size_hidden"], new["ema_dw_hidden"]
        state = metrics[MODEL_STATE]


@pytest.mark.slow  # ~5 s; fast counterpart: tests/models/test_vqvae.py::test_losses_match_numpy_and_route_gradients
def test_loss_codebook_is_a_parameter_trained_by_eq3():
    config = config_of(",codebook=loss")
    task, params, state, x = _step_inputs(config)
    assert task.init_state is None and state == {} and "codebook" in params["quantizer"]
    grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
    (loss, metrics), grads = grad_fn(params, {"image": x}, jax.random.PRNGKey(0))
    assert MODEL_STATE not in metrics and "restarted" not in metrics
    commit = float(metrics["commitment_loss"])  # = the codebook term in value
    np.testing.assert_allclose(float(loss), float(metrics["rec_loss"]) + 1.25 * commit, rtol=1e-6)
    assert float(jnp.abs(grads["quantizer"]["codebook"]).max()) > 0


def test_vqvae_trains_end_to_end_and_reconstructs_held_out_digits(tmp_path):
    workdir = str(tmp_path / "vq")
    config = config_of()
    trainer.main(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    assert {"rec_loss", "vq_loss", "perplexity", "codes_used", "restarted"} <= set(steps[0])
    assert steps[0]["restarted"] > 0  # the unused initial codes are restarted at step 1
    evals = [r for r in records if "psnr" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4
    assert 5 < evals[0]["psnr"] < 60 and -1 <= evals[0]["ssim"] <= 1
    assert 1 <= evals[0]["eval_perplexity"] <= 32 and 0 < evals[0]["eval_codes_used"] <= 1
    assert os.path.isfile(os.path.join(workdir, "samples", "step_000004.png"))
    _, task, params = tasks.restore(workdir)
    assert "vq_stats" in params  # the EMA codebook comes back with the weights
    out = np.asarray(task.sample_fn(params, jax.random.PRNGKey(1)))
    assert out.shape == (8, 16, 16, 1) and out.dtype == np.uint8
    originals = recipes.fixed_examples(config, 8)["image"][[0, 2, 5, 7]]  # evenly spaced over eval_examples=8
    np.testing.assert_array_equal(out[:4], np.asarray(media.to_uint8(originals)))
    assert not np.array_equal(out[4:], out[:4])


@pytest.mark.slow
def test_vqvae_resume_with_ema_state_equals_uninterrupted(tmp_path):
    """A run stopped at step 2 and resumed equals the uninterrupted one bit for bit: losses,
    restarts, and the final EMA codebook and statistics (the fast counterpart is
    tests/train/test_state.py::test_model_state_resumes_from_a_checkpoint_bit_for_bit...)."""
    from genjax.io import checkpoint

    def cfg(*extra):
        return config_of("", "--config.eval.sample_every_steps=0", *extra)

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    trainer.main(cfg(), straight, devices=jax.devices()[:1])
    trainer.main(cfg("--config.num_steps=2"), resumed, devices=jax.devices()[:1])
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    trainer.main(cfg(), resumed, devices=jax.devices()[:1])

    def logged(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [(r["loss"], r["restarted"], r["perplexity"]) for r in map(json.loads, f) if "loss" in r]

    assert logged(resumed) == logged(straight)
    a, b = checkpoint.restore_ema(straight), checkpoint.restore_ema(resumed)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    assert int(a["vq_stats"]["quantizer"]["counter"]) == 4
