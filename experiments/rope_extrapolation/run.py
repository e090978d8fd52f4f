"""Does the video DiT with 3D RoPE draw digits at sizes and durations it never saw in training?

Trains the demo's DiT stage (configs/demo_moving_mnist.py, 32 x 32 x 8-frame clips) with
model.pos_embed = "rope" on the demo's frozen VAE and text stages (a finished `make demo` run),
then samples every prompt "digit 0" ... "digit 9" at the training size and at larger canvases and
longer clips, with the demo's sampler settings, and judges the frames with the project's digit
classifier (`genjax.eval.evaluate.evaluate_videos`). The demo's own DiT (pos_embed "sincos",
2,500 steps) is judged at the same sizes for reference. See README.md for the results.

    PYTHONPATH=. python experiments/rope_extrapolation/run.py --demo runs/demo --workdir /tmp/rope --steps 1500
    PYTHONPATH=. python experiments/rope_extrapolation/run.py --demo runs/demo --workdir /tmp/rope_smoke --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np

# (frames, height, width): the training size first, then sizes no training clip had.
SIZES = [(8, 32, 32), (8, 48, 48), (16, 32, 32), (8, 32, 64), (16, 48, 48)]


def rope_config(demo: str, steps: int, smoke: bool):
    """The demo's DiT stage with 3D RoPE instead of sin-cos positions, on the demo's frozen stages."""
    from configs import demo_moving_mnist

    c = demo_moving_mnist.get_config("smoke=True" if smoke else None).dit
    c.unlock()
    trained = json.load(open(os.path.join(demo, "dit", "config.json")))
    c.task.update(vae=os.path.abspath(os.path.join(demo, "vae")), text_encoder=os.path.abspath(os.path.join(demo, "text")),
                  latent_scale=trained["task"]["latent_scale"])
    c.model.pos_embed = "rope"
    c.num_steps = steps
    c.eval.sample_every_steps = 0
    return c


def judge(workdir: str, sizes, per_prompt: int, num_steps: int, out: str) -> dict:
    """Samples of every prompt at every size from a trained run, judged; GIFs into `out`."""
    from genjax import tasks
    from genjax.eval import digit_classifier, evaluate
    from genjax.io import media

    config, task, params = tasks.restore(workdir)
    prompts = [f"digit {d}" for d in range(10) for _ in range(per_prompt)]
    classifier = digit_classifier.load_or_train()
    results = {}
    for t, h, w in sizes:
        start = time.time()
        videos = np.asarray(task.sample_fn(params, jax.random.PRNGKey(0), prompts, sampler="ddim", num_steps=num_steps,
                                           cfg_scale=4.0, num_frames=t, height=h, width=w))
        r = evaluate.evaluate_videos(videos, [int(p[-1]) for p in prompts], classifier_params=classifier)
        results[f"{t}x{h}x{w}"] = {"digit_accuracy": r["digit_accuracy"], "temporal_consistency": r["temporal_consistency"],
                                   "motion": r["motion"], "seconds": time.time() - start,
                                   "pos_embed": config.model.get("pos_embed", "sincos")}
        media.write_gif(os.path.join(out, f"{config.model.get('pos_embed', 'sincos')}_{t}x{h}x{w}.gif"),
                        videos[::per_prompt], captions=prompts[::per_prompt])
        print(f"{workdir} {t}x{h}x{w}: {results[f'{t}x{h}x{w}']}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="runs/demo", help="a finished `make demo` workdir (its vae, text and dit stages)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    from genjax.train import trainer

    os.makedirs(a.workdir, exist_ok=True)
    rope = os.path.join(a.workdir, "rope")
    cache = os.path.join(a.demo, "dit", "latents")
    if os.path.isdir(cache) and not os.path.isdir(os.path.join(rope, "latents")):  # same VAE and data: reuse
        shutil.copytree(cache, os.path.join(rope, "latents"))
    start = time.time()
    trainer.main(rope_config(a.demo, 4 if a.smoke else a.steps, a.smoke), rope)
    train_seconds = time.time() - start
    sizes = SIZES[:2] if a.smoke else SIZES
    per_prompt, steps = (1, 3) if a.smoke else (a.per_prompt, a.sample_steps)
    out = {"train_seconds": train_seconds, "steps": a.steps, "load_before_sampling": os.getloadavg(),
           "rope": judge(rope, sizes, per_prompt, steps, a.workdir),
           "sincos_demo": judge(os.path.join(a.demo, "dit"), sizes, per_prompt, steps, a.workdir)}
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
