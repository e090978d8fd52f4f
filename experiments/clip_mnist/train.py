"""Train a tiny CLIP on MNIST digits <-> "digit N" and Moving MNIST videos <-> captions.

    python experiments/clip_mnist/train.py --config configs/clip_moving_mnist.py[:smoke=True] \
        --workdir runs/clip_mnist [--config.num_steps=500 ...]

A plain optax loop (this study does not need checkpoints): each step draws a batch of digits
and a batch of videos, embeds both and their captions with `genjax.models.clip.CLIP`, and
minimises `clip_loss(images, texts) + clip_loss(videos, texts)` over the global batch, which is
sharded over the mesh's ("data", "fsdp") axes. Zero-shot accuracies ("digit 0" ... "digit 9")
go to WORKDIR/metrics.jsonl and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax.config import load_config
from genjax.data.sources import MnistEmbeddedSource, MovingMnistSource
from genjax.errors import UserError
from genjax.models import clip, contrastive
from genjax.models.tokenizer import ByteTokenizer
from genjax.parallel.mesh import make_mesh, shard_batch


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 127.5 - 1.0


def train(config, workdir: str) -> dict[str, float]:
    """Run the study; returns the final metrics."""
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh)
    tok = ByteTokenizer()
    model_kw = {k: v for k, v in config.model.items() if k not in ("variant", "dtype")}
    module = clip.CLIP(**model_kw, dtype=jnp.dtype(config.model.dtype))
    d = config.data
    digits, test_digits = MnistEmbeddedSource("train"), MnistEmbeddedSource("test")
    video_kw = dict(num_frames=d.num_frames, image_size=d.image_size, num_digits=d.num_digits,
                    caption_template=d.caption_template)
    videos = MovingMnistSource("train", num_examples=d.num_videos, seed=config.seed, **video_kw)
    test_videos = MovingMnistSource("test", num_examples=config.eval.num_videos, seed=config.seed, **video_kw)

    def batch(rng):
        i = rng.choice(len(digits), d.batch_size, replace=False)
        v = [videos[int(j)] for j in rng.choice(len(videos), d.batch_size, replace=False)]
        img_ids, img_mask = tok.encode([f"digit {n}" for n in digits.labels[i]], module.context_length)
        vid_ids, vid_mask = tok.encode([e["caption"] for e in v], module.context_length)
        return dict(images=_to_float(digits.images[i]), img_ids=img_ids, img_mask=img_mask,
                    videos=_to_float(np.stack([e["video"] for e in v])), vid_ids=vid_ids, vid_mask=vid_mask)

    rng = np.random.default_rng(config.seed)
    example = batch(np.random.default_rng(0))
    params = jax.jit(module.init)(jax.random.key(config.seed), example["img_ids"], example["img_mask"],
                                  example["images"], example["videos"])
    o = config.optim
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, config.num_steps, o.lr * o.end_lr_ratio) \
        if o.schedule == "cosine" else o.lr
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
                      optax.adamw(lr, o.b1, o.b2, o.eps, weight_decay=o.weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, b):
        def loss_fn(p):
            img = module.apply(p, b["img_ids"], b["img_mask"], b["images"])
            vid = module.apply(p, b["vid_ids"], b["vid_mask"], videos=b["videos"])
            li = contrastive.clip_loss(img["image"], img["text"], img["logit_scale"])
            lv = contrastive.clip_loss(vid["video"], vid["text"], vid["logit_scale"])
            return li + lv, (li, lv)

        (loss, (li, lv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, dict(loss=loss, image_loss=li, video_loss=lv)

    test_clips = [test_videos[i] for i in range(len(test_videos))]
    clips, clip_labels = np.stack([e["video"] for e in test_clips]), np.array([e["labels"][0] for e in test_clips])

    def evaluate():  # the first digit's label for multi-digit videos
        return dict(zero_shot_image=contrastive.zero_shot_accuracy(params, module, test_digits.images, test_digits.labels, tok),
                    zero_shot_video=contrastive.zero_shot_accuracy(params, module, clips, clip_labels, tok))

    log = open(os.path.join(workdir, "metrics.jsonl"), "a")
    start, metrics = time.time(), {}
    for s in range(1, config.num_steps + 1):
        params, opt_state, m = step(params, opt_state, shard_batch(batch(rng), mesh))
        record = None
        if s % config.log_every_steps == 0 or s == config.num_steps:
            record = {"step": s, **{k: float(v) for k, v in m.items()}, "seconds": round(time.time() - start, 1)}
        if (config.eval.every_steps and s % config.eval.every_steps == 0) or s == config.num_steps:
            record = {**(record or {"step": s}), **evaluate()}
        if record:
            metrics = record
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
    return metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    args, overrides = parser.parse_known_args(argv)
    try:
        train(load_config(args.config, overrides), args.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
