"""CLIP on Moving MNIST videos <-> captions and MNIST digits <-> "digit N".

    python experiments/clip_mnist/train.py --config configs/clip_moving_mnist.py --workdir runs/clip_mnist
    python experiments/clip_mnist/train.py --config configs/clip_moving_mnist.py:smoke=True --workdir /tmp/clip

Model: `genjax.models.clip` variant "tiny" (E = 64; byte tokenizer, context 32; text 2 x 64;
image ViT 2 x 64 on 28x28x1 digits in 7x7 patches; video: ViViT joint encoder 2 x 64 on 8-frame
32x32 one-digit Moving MNIST clips in 2x8x8 tubelets), 0.34 M parameters. Each step sums two
symmetric InfoNCE losses (Radford et al. 2021) over the global batch: digit images vs
"digit N", videos vs their captions (template `data.caption_template`). AdamW, warmup + cosine.

Evaluation (every `eval.every_steps` and at the end, into WORKDIR/metrics.jsonl): zero-shot
accuracy with the prompts "digit 0" ... "digit 9" on the 1,000 held-out test digits and on
`eval.num_videos` test videos (`genjax.models.contrastive.zero_shot_accuracy`).

Hardware: one CPU host is enough (0.34 M parameters); the batch is split over all local devices
on the ("data", "fsdp") mesh axes. Run time: NOT measured for the full 1,000 steps (an estimate:
minutes on a free multi-core CPU; the smoke run took 170 s on 2 heavily shared cores, almost all
of it XLA compilation). Expected result (estimate, from the image-only test run, which reaches
>= 0.9 zero-shot accuracy on the test digits in 1,500 steps of batch 128): image zero-shot
accuracy near 0.9 and video zero-shot accuracy well above chance (0.1).
Smoke (`smoke=True`): 20 steps, batch 16; its accuracies are at chance (measured 0.10 / 0.125).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.errors import check
from genjax.models import clip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, variant="tiny")
    check(a.variant in clip.VARIANTS, "variant", a.variant, f"must be one of {list(clip.VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(
        image_dataset="mnist_embedded", video_dataset="moving_mnist", batch_size=64, num_frames=8,
        image_size=32, num_digits=1, caption_template="digit {d0}", num_videos=10_000))
    c.model = ml_collections.ConfigDict(dict(variant=a.variant, **clip.VARIANTS[a.variant], dtype="float32"))
    c.optim = common.optim(lr=3e-3, schedule="cosine", warmup_steps=50, weight_decay=1e-4)
    c.mesh = common.mesh()
    c.eval = ml_collections.ConfigDict(dict(every_steps=250, num_videos=500))
    if a.smoke:
        c.num_steps = 20
        c.log_every_steps = 5
        c.data.batch_size = 16
        c.optim.warmup_steps = 5
        c.eval.update(every_steps=0, num_videos=32)
    c.lock()
    return c
