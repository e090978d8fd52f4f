"""Judge a trained DALL·E (task "dalle") at several sampling settings with the digit classifier.

From the run's EMA weights (`genjax.tasks.restore`) this draws `--per-digit` samples for each
prompt "digit 0" .. "digit 9" with the task's own `sample_fn` (token by token, `dalle.generate`)
at each setting (temperature 1; top-k --top-k; temperature 0.8; top-p 0.9; and with `--clip` the first two with
CLIP re-ranking of --rerank candidates),
all with the same key, and reports the share the digit classifier (`genjax.eval.digit_classifier`)
reads as the prompted digit, overall and per digit. It also copies the dVAE's held-out
reconstruction figures (its metrics.jsonl) into the results.

    PYTHONPATH=. python experiments/dalle_mnist/evaluate.py --dalle RUN [--clip CLIP_RUN] --out results.json

Writes --out (JSON) and, beside it, samples.png: 8 samples per digit at the first setting (and
samples_rerank.png with re-ranking), one row per digit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)



def main(argv=None) -> int:
    import jax
    import numpy as np

    from genjax import tasks
    from genjax.eval import digit_classifier
    from genjax.io import checkpoint, media

    p = argparse.ArgumentParser()
    p.add_argument("--dalle", required=True)
    p.add_argument("--clip", default="")
    p.add_argument("--rerank", type=int, default=4)
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    config = checkpoint.read_config(args.dalle)
    if args.clip:
        config.task.clip = args.clip
    task = tasks.build(config)
    params = tasks.restore(args.dalle)[2]
    classifier = digit_classifier.load_or_train()
    prompts = [f"digit {d}" for d in range(10) for _ in range(args.per_digit)]
    labels = np.repeat(np.arange(10), args.per_digit)
    base = [{"temperature": 1.0}, {"temperature": 1.0, "top_k": args.top_k}, {"temperature": 0.8},
            {"temperature": 1.0, "top_p": 0.9}]
    settings = base + ([{**s, "rerank": args.rerank} for s in base[:2]] if args.clip else [])
    results, out_dir = [], os.path.dirname(os.path.abspath(args.out))
    for s in settings:
        start = time.perf_counter()
        images = np.asarray(task.sample_fn(params, jax.random.PRNGKey(0), prompts, **s))
        seconds = time.perf_counter() - start
        pred = digit_classifier.read_digits(classifier, images)
        per_digit = [float(np.mean(pred[labels == d] == d)) for d in range(10)]
        results.append({**s, "digit_accuracy": float(np.mean(pred == labels)), "per_digit": per_digit,
                        "samples": len(images), "seconds": round(seconds, 1)})
        print(json.dumps(results[-1]), flush=True)
        if s in (base[0], {**base[0], "rerank": args.rerank}):
            keep = np.concatenate([np.arange(d * args.per_digit, d * args.per_digit + 8) for d in range(10)])
            name = "samples_rerank.png" if "rerank" in s else "samples.png"
            media.write_png_grid(os.path.join(out_dir, name), images[keep], ncols=8)

    dvae_metrics = {}
    with open(os.path.join(config.task.dvae, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "psnr" in record:
                dvae_metrics = record
    with open(args.out, "w") as f:
        json.dump({"dvae_held_out": dvae_metrics, "samples_per_digit": args.per_digit, "settings": results}, f,
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
