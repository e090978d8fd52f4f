"""Evaluate a trained VAR run (task "var") and time it against the DiT of the same size.

    python experiments/var_mnist/evaluate.py --workdir RUN --out experiments/var_mnist

1. Digit accuracy: `--per-class` class-conditional samples per digit (seed 1) at each of
   `--settings` (comma-separated `cfg_scale[:top_k:top_p]`, e.g. `1,3,3:28:0.96`), read by
   `genjax.eval.digit_classifier`; the fraction read as their class, overall and per class.
2. Speed: samples per second of VAR's `sample_fn` (unguided and guided) and of the pixel-space DiT
   of configs/dit_mnist.py with the VAR's width / depth / heads (patch 2, float32, random weights:
   speed does not depend on training) through its task's `sample_fn` (DDIM, cfg 4) at each of
   `--dit-steps` (empty: no timing), all on `--num` samples, each the median of 2 timed calls after a compiling one.
Writes OUT/results.json and OUT/samples.png (10 samples per class, one row per class, at the
setting `--grid`). Nothing here generates: it calls the tasks' functions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import numpy as np

from genjax import tasks
from genjax.config import load_config
from genjax.eval import digit_classifier
from genjax.io import media

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeats=2):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--settings", default="1,2,3")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--dit-steps", default="25,50")
    p.add_argument("--grid", default="3:28:0.96", help="the setting drawn in samples.png")
    a = p.parse_args()
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    results = {"uptime_before": uptime(), "workdir": a.workdir}
    config, task, params = tasks.restore(a.workdir)
    classifier = digit_classifier.load_or_train()
    labels = np.repeat(np.arange(10), a.per_class)
    accuracy, grid = {}, None
    for setting in a.settings.split(","):
        w, top_k, top_p = (setting + "::").split(":")[:3]
        w, top_k, top_p = float(w), int(top_k or 0), float(top_p or 1.0)
        start = time.perf_counter()
        images = np.asarray(task.sample_fn(params, jax.random.PRNGKey(1), labels, cfg_scale=w, top_k=top_k,
                                           top_p=top_p))
        pred = digit_classifier.read_digits(classifier, images)
        per_class = [float(np.mean(pred[labels == c] == c)) for c in range(10)]
        accuracy[setting] = {"cfg_scale": w, "top_k": top_k, "top_p": top_p, "accuracy": float(np.mean(pred == labels)),
                             "per_class": per_class, "seconds": time.perf_counter() - start}
        print(f"{setting}: accuracy {accuracy[setting]['accuracy']:.3f} per class {np.round(per_class, 2)}", flush=True)
        if grid is None and setting == a.grid:
            grid = images.reshape(10, a.per_class, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
    results["digit_accuracy"] = accuracy
    if grid is not None:
        media.write_png_grid(os.path.join(a.out, "samples.png"), grid, ncols=10)
    if not a.dit_steps:
        results.update(uptime_after=uptime())
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        return

    m = config.model
    speed_labels = np.arange(a.num) % 10
    speed = {}
    for w in (1.0, float(config.eval.cfg_scale)):
        t = timed(lambda w=w: task.sample_fn(params, jax.random.PRNGKey(2), speed_labels, cfg_scale=w))
        speed[f"var_cfg{w}"] = {"seconds": t, "samples_per_s": a.num / t}
    dit_config = load_config(os.path.join(ROOT, "configs", "dit_mnist.py"), [
        f"--config.model.hidden_size={m.hidden_size}", f"--config.model.depth={m.depth}",
        f"--config.model.num_heads={m.num_heads}", "--config.model.dtype=float32", "--config.mesh.data=1"])
    dit = tasks.build(dit_config)
    dit_params = nn.unbox(dit.init_params(jax.random.PRNGKey(0)))
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    results["parameters"] = {"var": count({k: v for k, v in params.items() if k != "vqvae"}),
                             "dit": count(dit_params)}
    for steps in (int(s) for s in a.dit_steps.split(",")):
        t = timed(lambda steps=steps: dit.sample_fn(dit_params, jax.random.PRNGKey(2), list(speed_labels), num_steps=steps,
                                        cfg_scale=4.0))
        speed[f"dit_ddim{steps}_cfg4"] = {"seconds": t, "samples_per_s": a.num / t}
    for k, v in speed.items():
        print(f"{k}: {v['samples_per_s']:.2f} samples/s ({v['seconds']:.2f} s for {a.num})", flush=True)
    results.update(speed=speed, num_timed=a.num, uptime_after=uptime(), devices=str(jax.devices()))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
