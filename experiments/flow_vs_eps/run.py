"""Flow matching vs epsilon prediction on the MNIST DiT, with the same compute (issue 15, item 3).

For objective in (eps, flow) this trains the pixel-space class-conditional DiT of
`configs/dit_mnist.py` through the normal trainer (`genjax.train.trainer.main`) with the same
model size, batch, steps, lr, EMA and seed; only `objective=` differs (eps: linear betas,
epsilon prediction, learned variance / hybrid loss; flow: rectified flow, velocity target,
logit-normal timesteps). Then, from each run's EMA weights (`genjax.tasks.restore`), it draws
`--per-class` digits of every class 0..9 with the task's `sample_fn` at 10, 25 and 50 sampler
steps (eps: ddim; flow: euler and heun), all with the same cfg_scale and the same initial noise,
and judges each sample with the digit classifier (`genjax.eval.digit_classifier`): accuracy =
fraction whose argmax is the requested label, overall and per class.

    PYTHONPATH=. python experiments/flow_vs_eps/run.py --workdir /tmp/flow_vs_eps --steps 1000
    PYTHONPATH=. python experiments/flow_vs_eps/run.py --workdir /tmp/flow_vs_eps_smoke --smoke

Writes WORKDIR/results.json (and WORKDIR/{eps,flow}/ the two training runs, samples_*.npz) and
prints a markdown table. Training is skipped for a run whose checkpoint already has --steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OBJECTIVES = ("eps", "flow")
SAMPLERS = {"eps": ("ddim",), "flow": ("euler", "heun")}
STEP_COUNTS = (10, 25, 50)


def overrides(args) -> list[str]:
    """The config overrides shared by both objectives (everything but `objective=`)."""
    if args.smoke:
        return ["--config.eval.sample_every_steps=0",
                f"--config.ckpt.save_interval_steps={args.steps}", "--config.ckpt.max_to_keep=1"]
    return [
        "--config.model.depth=4", "--config.model.hidden_size=128", "--config.model.num_heads=4",
        "--config.model.patch_size=4", "--config.model.dtype=float32",
        f"--config.data.batch_size={args.batch}", f"--config.optim.lr={args.lr}",
        "--config.optim.ema_decay=0.999", "--config.optim.ema_warmup=True",
        "--config.eval.sample_every_steps=0", f"--config.eval.cfg_scale={args.cfg_scale}",
        f"--config.ckpt.save_interval_steps={args.steps}", "--config.ckpt.max_to_keep=1",
        "--config.log_every_steps=50", f"--config.seed={args.seed}",
    ]


def num_fn_evals(sampler: str, steps: int) -> int:
    """Denoiser evaluations per sample (each one a guided pair: conditional + null)."""
    return 2 * steps - 1 if sampler == "heun" else steps  # Heun's last step is Euler


def last_step(workdir: str) -> int | None:
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else None


def train(objective: str, args) -> dict:
    from genjax.config import load_config
    from genjax.train import trainer

    workdir = os.path.join(args.workdir, objective)
    spec = os.path.join(REPO, "configs", "dit_mnist.py") + f":objective={objective},steps={args.steps}"
    if args.smoke:
        spec += ",smoke=True"
    config = load_config(spec, overrides(args))
    if last_step(workdir) == args.steps:
        print(f"{objective}: checkpoint at step {args.steps} exists in {workdir}; not training")
        return {"workdir": workdir, "skipped": True}
    t0 = time.time()
    metrics = trainer.main(config, workdir)
    wall = time.time() - t0
    print(f"{objective}: trained {args.steps} steps in {wall:.0f} s; last metrics {metrics}")
    return {"workdir": workdir, "train_wall_s": round(wall, 1),
            "last_metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}}


def evaluate(objective: str, args, classifier) -> list[dict]:
    import jax
    import numpy as np
    from tqdm import tqdm

    from genjax import tasks
    from genjax.eval import digit_classifier

    workdir = os.path.join(args.workdir, objective)
    config, task, params = tasks.restore(workdir)
    labels = np.repeat(np.arange(10), args.per_class)
    rng = jax.random.PRNGKey(args.sample_seed)  # the same noise for every run and sampler
    rows = []
    jobs = [(s, n) for s in SAMPLERS[objective] for n in STEP_COUNTS]
    for sampler, steps in tqdm(jobs, desc=f"sample {objective}"):
        t0 = time.time()
        images = np.asarray(jax.device_get(task.sample_fn(params, rng, labels, sampler=sampler,
                                                          num_steps=steps, cfg_scale=args.cfg_scale)))
        wall = time.time() - t0
        logits, _ = digit_classifier.logits_and_features(classifier, images)
        pred = logits.argmax(-1)
        hit = pred == labels
        np.savez_compressed(os.path.join(workdir, f"samples_{sampler}_{steps}.npz"), images=images,
                            labels=labels, predicted=pred)
        rows.append(dict(objective=objective, sampler=sampler, num_steps=steps,
                         nfe=num_fn_evals(sampler, steps), cfg_scale=args.cfg_scale, n=int(labels.size),
                         accuracy=float(hit.mean()),
                         per_class=[float(hit[labels == c].mean()) for c in range(10)],
                         sample_wall_s=round(wall, 1)))
    return rows


def table(rows: list[dict]) -> str:
    runs = sorted({(r["objective"], r["sampler"]) for r in rows}, key=lambda k: (OBJECTIVES.index(k[0]), k[1]))
    acc = {(r["objective"], r["sampler"], r["num_steps"]): r["accuracy"] for r in rows}
    lines = ["| objective | sampler | " + " | ".join(f"{n} steps" for n in STEP_COUNTS) + " |",
             "|---|---|" + "---|" * len(STEP_COUNTS)]
    for obj, s in runs:
        cells = [f"{acc[(obj, s, n)]:.3f}" if (obj, s, n) in acc else "-" for n in STEP_COUNTS]
        lines.append(f"| {obj} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=None, help="training steps per objective (default 1000; smoke 20)")
    p.add_argument("--smoke", action="store_true", help="the tiny smoke model, 1 digit per class")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 20; smoke 1)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--sample-seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.smoke else 1000)
    args.per_class = args.per_class or (1 if args.smoke else 20)
    os.makedirs(args.workdir, exist_ok=True)

    from genjax.eval import digit_classifier

    t0 = time.time()
    runs = {}
    for objective in OBJECTIVES:  # one training at a time
        runs[objective] = train(objective, args)
    classifier = digit_classifier.load_or_train()
    rows = []
    for objective in OBJECTIVES:
        rows += evaluate(objective, args, classifier)
    result = dict(args=vars(args), overrides=overrides(args), runs=runs, results=rows,
                  total_wall_s=round(time.time() - t0, 1), machine=platform.machine(),
                  load_avg_at_end=os.getloadavg())
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(rows))
    print(f"total wall time {result['total_wall_s']:.0f} s; results in {args.workdir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
