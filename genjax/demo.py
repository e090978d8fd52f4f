"""`genjax demo`: the most complete end-to-end job that exists today, on real MNIST digits.

    genjax demo [--workdir runs/demo] [--steps N]

1. Data: writes a preview of procedural Moving MNIST (real digits) -> WORKDIR/data_preview.gif.
2. Train: a class-conditional pixel-space DiT (configs/dit_mnist.py:demo=True) on the 4,000
   embedded training digits with the genjax trainer (sharded jit step, EMA, orbax checkpoints,
   metrics.jsonl) -> WORKDIR/dit/. Running the demo again resumes or reuses the finished run.
3. Sample: DDIM-50 with classifier-free guidance from the EMA weights, 10 samples per digit ->
   WORKDIR/samples/digits.png, the denoising as WORKDIR/samples/denoising.gif and .mp4, and
   WORKDIR/samples.npz (`images` uint8 (N, 28, 28, 1), `prompts`).
4. Evaluate: a separate digit classifier (trained only on the training digits) reads the
   samples; prints its accuracy on the prompted digits. Loss curve -> WORKDIR/loss.png.

The text-to-video Moving MNIST job of the main-job issue replaces this once the video stack lands.
"""

from __future__ import annotations

import json
import os

import numpy as np

from genjax.errors import check

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "dit_mnist.py")
SAMPLES_PER_DIGIT = 10


def plot_losses(metrics_path: str, out: str) -> str:
    """Loss against step from a metrics.jsonl -> PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="DiT on MNIST digits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(args) -> int:
    import jax
    import jax.numpy as jnp

    from genjax.config import load_config
    from genjax.data import preview
    from genjax.io import media
    from genjax.train import trainer

    check(args.steps is None or args.steps >= 1, "--steps", args.steps, "must be >= 1")
    workdir = os.path.abspath(args.workdir)
    train_dir = os.path.join(workdir, "dit")
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

    print("[1/4] data: Moving MNIST preview from real MNIST digits")
    preview.show("moving_mnist", os.path.join(workdir, "data_preview.gif"), num=8, split="train",
                 data_dir=None, seed=0, options={"num_digits": 2})

    print("[2/4] train: class-conditional DiT on MNIST digits (resumes if interrupted)")
    arg = "demo=True" + (f",steps={args.steps}" if args.steps else "")
    config = load_config(f"{CONFIG}:{arg}")
    trainer.main(config, train_dir)

    print("[3/4] sample: DDIM-50 with classifier-free guidance from the EMA weights")
    config, _, ema_params, sample_fn = trainer.restore_trained(train_dir)
    labels = np.repeat(np.arange(10, dtype=np.int32), SAMPLES_PER_DIGIT)
    images, trajectory = sample_fn(ema_params, jax.random.PRNGKey(config.seed),
                                   jnp.asarray(labels), trajectory=True)
    images, trajectory = np.asarray(images), np.asarray(trajectory)
    prompts = np.array([f"digit {d}" for d in labels])
    samples = os.path.join(workdir, "samples")
    media.write_png_grid(os.path.join(samples, "digits.png"), images, ncols=SAMPLES_PER_DIGIT)
    # One tile per digit: the first sample of each class, denoised step by step.
    firsts = np.arange(0, len(labels), SAMPLES_PER_DIGIT)
    videos = np.moveaxis(trajectory[:, firsts], 0, 1)  # (10, steps + 1, H, W, C)
    videos = np.concatenate([videos, np.repeat(videos[:, -1:], 10, axis=1)], axis=1)  # hold the end
    captions = [f"digit {d}" for d in range(10)]
    media.write_gif(os.path.join(samples, "denoising.gif"), videos, fps=12, captions=captions)
    media.write_mp4(os.path.join(samples, "denoising.mp4"), videos, fps=12, captions=captions)
    np.savez(os.path.join(workdir, "samples.npz"), images=images, prompts=prompts)
    plot_losses(os.path.join(train_dir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))

    print("[4/4] evaluate: digit classifier on the generated samples")
    from genjax.eval import digit_classifier

    clf = digit_classifier.load_or_train()
    predicted = np.asarray(digit_classifier.predict(clf, images))
    per_digit = [float(np.mean(predicted[labels == d] == d)) for d in range(10)]
    accuracy = float(np.mean(per_digit))
    result = {"digit_accuracy": accuracy, "per_digit_accuracy": per_digit,
              "num_samples": int(len(labels)), "train_steps": int(config.num_steps)}
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nDone. Everything is in {workdir}:")
    for name in ("data_preview.gif", "samples/digits.png", "samples/denoising.gif",
                 "samples/denoising.mp4", "samples.npz", "loss.png", "eval.json",
                 "dit/metrics.jsonl", "dit/checkpoints/", "dit/samples/"):
        print(f"  {os.path.join(workdir, name)}")
    print(f"Digit classifier accuracy on the samples (prompted digit recognised): {accuracy:.1%}")
    print("  per digit: " + " ".join(f"{d}:{a:.0%}" for d, a in enumerate(per_digit)))
    return 0
