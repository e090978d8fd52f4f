"""MDT vs DiT on the MNIST DiT config at equal training compute (issue 17, item 6).

Both models are `configs/dit_mnist.py` with the overrides of experiments/flow_vs_eps (depth 4,
width 128, 4 heads, patch 4, batch 64, AdamW constant lr, EMA 0.999 with warm-up) and
`objective=flow`; the MDT run adds `mdt=True` (task "mdt": two decoder blocks, one
side-interpolator block, 30 % masked). An MDT step costs more than a DiT step (a full and a
masked branch), so the MDT is trained for fewer steps: the ratio of the two compiled train steps'
FLOPs (XLA's cost analysis of `jax.grad(task.loss_fn)`) sets its step counts, so that each
evaluation point compares the two models after the same number of training FLOPs.

At every point each run is extended (the trainer resumes and extends num_steps; with a constant
lr that is the same computation as training straight), then `--per-class` digits of every class
are sampled from its EMA weights (Euler, 25 steps, cfg_scale 4, the same noise for both models)
and judged by `genjax.eval.digit_classifier`: accuracy (the requested digit) and the Frechet
distance of the classifier's features of the samples to those of the 1,000 held-out test digits.

    PYTHONPATH=. python experiments/mdt_mnist/run.py --workdir /tmp/mdt_mnist --dit-steps 500,1000,1500
    PYTHONPATH=. python experiments/mdt_mnist/run.py --workdir /tmp/mdt_smoke --smoke     # ~2 min

Writes WORKDIR/results.json, WORKDIR/samples_<model>_<step>.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
_spec = importlib.util.spec_from_file_location("flow_vs_eps", os.path.join(REPO, "experiments", "flow_vs_eps", "run.py"))
flow_vs_eps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flow_vs_eps)

MODELS = ("dit", "mdt")


def config(model: str, steps: int, args):
    from genjax.config import load_config

    spec = os.path.join(REPO, "configs", "dit_mnist.py") + f":objective=flow,steps={steps}"
    spec += ",mdt=True" if model == "mdt" else ""
    spec += ",smoke=True" if args.smoke else ""
    return load_config(spec, flow_vs_eps.overrides(args))


def step_flops(model: str, args) -> float:
    """XLA's FLOP count of one compiled gradient step of the model's loss (batch of the config)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from genjax import tasks

    c = config(model, 1, args)
    task = tasks.build(c)
    params = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    b, s, ch = c.data.batch_size, c.data.image_size, c.data.channels
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, ch), jnp.float32), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    grad = jax.jit(jax.grad(lambda p, batch, rng: task.loss_fn(p, batch, rng)[0]))
    cost = grad.lower(params, batch, jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def evaluate(model: str, step: int, args, classifier, real_features) -> dict:
    import jax
    import numpy as np

    from genjax import tasks
    from genjax.eval import digit_classifier, evaluate as ev
    from genjax.io import media

    _, task, params = tasks.restore(os.path.join(args.workdir, model))
    labels = np.repeat(np.arange(10), args.per_class)
    t0 = time.time()
    images = np.asarray(jax.device_get(task.sample_fn(params, jax.random.PRNGKey(args.sample_seed), labels,
                                                      sampler="euler", num_steps=25, cfg_scale=4.0)))
    wall = time.time() - t0
    logits, features = digit_classifier.logits_and_features(classifier, images)
    hit = logits.argmax(-1) == labels
    keep = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(10)])
    media.write_png_grid(os.path.join(args.workdir, f"samples_{model}_{step}.png"), images[keep], ncols=8)
    return dict(model=model, step=step, accuracy=float(hit.mean()),
                per_class=[float(hit[labels == c].mean()) for c in range(10)],
                frechet=float(ev._frechet(features, real_features)), sample_wall_s=round(wall, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--dit-steps", default=None, help="comma-separated DiT step counts (default 500,1000,1500; smoke 4,8)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--per-class", type=int, default=None, help="samples per class (default 20; smoke 2)")
    p.add_argument("--sample-seed", type=int, default=0)
    args = p.parse_args(argv)
    dit_steps = [int(s) for s in (args.dit_steps or ("4,8" if args.smoke else "500,1000,1500")).split(",")]
    args.per_class = args.per_class or (2 if args.smoke else 20)
    args.steps = max(dit_steps)  # flow_vs_eps.overrides saves a checkpoint every args.steps
    os.makedirs(args.workdir, exist_ok=True)

    import numpy as np

    from genjax.data import sources
    from genjax.eval import digit_classifier
    from genjax.train import trainer

    t0, load_before = time.time(), os.getloadavg()
    flops = {m: step_flops(m, args) for m in MODELS}
    ratio = flops["mdt"] / flops["dit"]
    plan = {"dit": dit_steps, "mdt": [max(1, round(s / ratio)) for s in dit_steps]}
    print(f"train-step GFLOPs: dit {flops['dit'] / 1e9:.1f}, mdt {flops['mdt'] / 1e9:.1f} (ratio {ratio:.2f}); "
          f"steps {plan}")
    classifier = digit_classifier.load_or_train()
    test = sources.MnistEmbeddedSource("test")
    real = np.stack([test[i]["image"] for i in range(len(test))])
    real_features = digit_classifier.logits_and_features(classifier, real)[1]
    rows, train_wall = [], {m: 0.0 for m in MODELS}
    for i, point in enumerate(dit_steps):
        for model in MODELS:
            steps = plan[model][i]
            workdir = os.path.join(args.workdir, model)
            c = config(model, steps, args)
            with c.unlocked():
                c.ckpt.save_interval_steps = steps
            if flow_vs_eps.last_step(workdir) != steps:
                t = time.time()
                trainer.main(c, workdir)
                train_wall[model] += time.time() - t
            row = evaluate(model, steps, args, classifier, real_features)
            row.update(dit_equivalent_steps=point, train_gflops=round(steps * flops[model] / 1e9, 1),
                       train_wall_s_so_far=round(train_wall[model], 1))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_class"}))
    result = dict(args=vars(args), step_gflops={m: flops[m] / 1e9 for m in MODELS}, flops_ratio=ratio, plan=plan,
                  results=rows, total_wall_s=round(time.time() - t0, 1), load_before=load_before,
                  load_after=os.getloadavg())
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("| DiT-equivalent steps | model | steps | train GFLOPs | accuracy | Frechet (classifier features) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dit_equivalent_steps']} | {r['model']} | {r['step']} | {r['train_gflops']} | "
              f"{r['accuracy']:.3f} | {r['frechet']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
