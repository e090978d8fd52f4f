"""Tasks "dvae" and "dalle" end to end on the smoke configs: a dVAE trained through `trainer.main`
(annealed temperature, held-out PSNR / SSIM, code usage), a DALL·E transformer trained on its
frozen tokens (digit accuracy of prompted samples logged), and `genjax sample --prompt` writing the
images, their prompts and the PNG grid; the annealing curves' end points; config errors."""

import json
import math
import os

import jax
import numpy as np
import pytest

from genjax import cli
from genjax.config import load_config
from genjax.errors import UserError
from genjax.tasks import dvae as dvae_task
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_of(name, arg="", *overrides):
    return load_config(os.path.join(ROOT, "configs", f"{name}_mnist.py") + f":smoke=True{arg}",
                       ["--config.mesh.data=1", *overrides])


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_anneal_curves_run_from_start_to_end():
    """cosine: start, the mean half way, end from `steps` on; exponential: the geometric mean half
    way (DALL·E App. A.2 anneals tau 1 -> 1/16 and beta 0 -> 6.6)."""
    values = [float(dvae_task.anneal(s, 1.0, 1 / 16, 100)) for s in (0, 50, 100, 500)]
    np.testing.assert_allclose(values, [1.0, (1 + 1 / 16) / 2, 1 / 16, 1 / 16], rtol=1e-6)
    np.testing.assert_allclose(float(dvae_task.anneal(50, 1.0, 1 / 16, 100, "exponential")), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(dvae_task.anneal(25, 0.0, 6.6, 50)), 3.3, rtol=1e-6)
    assert float(dvae_task.anneal(0, 0.0, 6.6, 0)) == np.float32(6.6)


def _train(name, workdir, arg="", *overrides):
    trainer.main(config_of(name, arg, *overrides), workdir, devices=jax.devices()[:1])
    return _records(workdir)


@pytest.mark.slow  # ~43 s under make test (two trainer runs + genjax sample); fast: tests/models/test_dalle.py
def test_dvae_then_dalle_train_and_sample_from_a_prompt(tmp_path, capsys):
    """The fast chain (no periodic evaluation: `test_evaluations_...` below, slow, has it)."""
    dvae_dir, dalle_dir = str(tmp_path / "dvae"), str(tmp_path / "dalle")
    steps = [r for r in _train("dvae", dvae_dir, "", "--config.eval.sample_every_steps=0") if "loss" in r]
    assert len(steps) == 4 and steps[-1]["loss"] < steps[0]["loss"]
    temps = [r["temperature"] for r in steps]  # cosine 1 -> 1/16 over the 4 steps, read at steps 0..3
    np.testing.assert_allclose(temps, [1 / 16 + (15 / 16) * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)],
                               rtol=1e-5)
    with pytest.raises(UserError, match="task.dvae"):  # a dVAE workdir is required
        trainer.validate(config_of("dalle", f",dvae={tmp_path}"))

    records = _train("dalle", dalle_dir, f",dvae={dvae_dir}", "--config.eval.sample_every_steps=0")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and steps[-1]["image_loss"] < steps[0]["image_loss"]
    np.testing.assert_allclose(steps[0]["loss"], steps[0]["text_loss"] / 8 + 7 * steps[0]["image_loss"] / 8, rtol=1e-5)

    out = str(tmp_path / "sevens.npz")
    args = ["sample", "--workdir", dalle_dir, "--prompt", "digit 7", "--prompt", "digit 1", "--num", "2",
            "--top-k", "3", "--temperature", "0.8", "--out", out]
    assert cli.main(args) == 0
    with np.load(out) as f:
        assert f["images"].shape == (4, 16, 16, 1) and f["images"].dtype == np.uint8
        assert f["prompts"].tolist() == ["digit 7", "digit 7", "digit 1", "digit 1"]
    assert os.path.isfile(str(tmp_path / "sevens.png"))
    capsys.readouterr()
    assert cli.main(args[:-2] + ["--top-p", "1.5", "--out", str(tmp_path / "x.npz")]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.slow  # 50 s on the shared 2-core CPU: three trainings with their evaluation compiled
def test_evaluations_log_psnr_and_digit_accuracy_and_clip_reranking_keeps_the_best(tmp_path):
    """The smoke configs with their periodic evaluation: the dVAE logs held-out PSNR / SSIM and
    code usage, DALL·E the digit classifier's accuracy on prompted samples; with a CLIP workdir
    and rerank = 3 sample_fn returns, per prompt, the candidate (the same draws as rerank = 1 on
    the prompts repeated 3 times) that the CLIP scores highest."""
    from genjax import tasks
    from genjax.tasks import dalle as dalle_task

    dvae_dir, dalle_dir, clip_dir = (str(tmp_path / n) for n in ("dvae", "dalle", "clip"))
    (evals,) = [r for r in _train("dvae", dvae_dir) if "psnr" in r]
    assert 5 < evals["psnr"] < 60 and -1 <= evals["ssim"] <= 1
    assert 1 <= evals["eval_perplexity"] <= 16 and 0 < evals["eval_codes_used"] <= 1
    (evals,) = [r for r in _train("dalle", dalle_dir, f",dvae={dvae_dir}") if "digit_accuracy" in r]
    assert 0 <= evals["digit_accuracy"] <= 1
    assert os.path.isfile(os.path.join(dalle_dir, "samples", "step_000004.png"))

    trainer.main(load_config(os.path.join(ROOT, "configs", "clip_mnist.py") + ":smoke=True",
                             ["--config.mesh.data=1", "--config.eval.sample_every_steps=0"]),
                 clip_dir, devices=jax.devices()[:1])
    _, _, params = tasks.restore(dalle_dir)
    task = tasks.build(config_of("dalle", f",dvae={dvae_dir},clip={clip_dir},rerank=3"))
    prompts, rng = ["digit 3", "digit 8"], jax.random.PRNGKey(0)
    best = np.asarray(task.sample_fn(params, rng, prompts))
    candidates = np.asarray(task.sample_fn(params, rng, [p for p in prompts for _ in range(3)], rerank=1))
    scores = dalle_task._clip_scorer(clip_dir, None)(candidates, [p for p in prompts for _ in range(3)])
    expect = candidates.reshape(2, 3, *candidates.shape[1:])[np.arange(2), scores.reshape(2, 3).argmax(1)]
    np.testing.assert_array_equal(best, expect)
