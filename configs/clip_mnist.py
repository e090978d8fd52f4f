"""CLIP (Radford et al. 2021) on real MNIST digits <-> "digit N" captions, or on one-digit Moving
MNIST videos <-> captions (`video=True`), with the byte tokenizer; the text encoder for
text-conditioned generation.

    genjax train --config configs/clip_mnist.py --workdir runs/clip_mnist
    genjax train --config configs/clip_mnist.py:video=True --workdir runs/clip_moving_mnist
    genjax train --config configs/clip_mnist.py:smoke=True --workdir /tmp/clip_smoke   # seconds, CPU

Model: the "tiny" CLIP of `genjax.models.clip` (E = 64; text 2 layers x 64 wide, context 32 bytes;
images 28 x 28 in 7 x 7 patches; videos 8 x 32 x 32 in 2 x 8 x 8 tubelets), softmax InfoNCE loss
over the global batch. Captions repeat (10 classes), so a batch holds false negatives; the loss
still orders the right caption first. AdamW lr 1e-3, batch 256, 5k steps. Every 500 steps the
zero-shot accuracy on 1,000 test digits (prompts "digit 0" ... "digit 9") is logged to
metrics.jsonl as `zero_shot_accuracy`.

Hardware: one accelerator or a CPU. Run time: ESTIMATE, not measured: the towers are ~0.2M
parameters; minutes on one GPU, tens of minutes on a CPU. Expected result (estimate):
zero_shot_accuracy above 0.9 on digits (chance 0.1). Measured on 2 shared CPU cores with
`:steps=3000 --config.data.batch_size=128`: 0.745 / 0.872 / 0.906 / 0.930 at steps 1k / 1.5k /
2k / 3k on the 1,000 test digits (5 CPU minutes).
Smoke (`smoke=True`): 1-layer towers 32 wide, batch 16, 4 steps, zero-shot accuracy on 20 test
digits at step 4; seconds on a CPU (tests/train/test_tasks.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import clip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, video=False, steps=0)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5000
    c.log_every_steps = 50
    if a.video:
        c.data = ml_collections.ConfigDict(dict(dataset="moving_mnist", split="train", batch_size=256,
                                                image_size=32, num_frames=8, num_digits=1,
                                                num_examples=100_000, channels=1))
    else:
        c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=256,
                                                image_size=28, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="clip", **clip.VARIANTS["tiny"], loss="clip",
                                             dtype="float32"))
    c.optim = common.optim(lr=1e-3, weight_decay=0.1, ema_decay=0.999)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=500, num_samples=1000)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=16)
        if a.video:
            c.data.update(num_examples=64)
        c.model.update(embed_dim=32, text_width=32, text_layers=1, vision_width=32, vision_layers=1,
                       video_layers=1)
        c.optim.update(ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=20)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
