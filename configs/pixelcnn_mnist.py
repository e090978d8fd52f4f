"""Class-conditional gated PixelCNN (`genjax.models.pixelcnn`) on binarised MNIST digits, task "pixelcnn".

    genjax train --config configs/pixelcnn_mnist.py --workdir runs/pixelcnn_mnist               # "mnist" variant
    genjax train --config configs/pixelcnn_mnist.py:cpu=True --workdir runs/pixelcnn_cpu         # experiments/pixelcnn_mnist
    genjax train --config configs/pixelcnn_mnist.py:smoke=True --workdir /tmp/pixelcnn_smoke     # seconds, CPU
    genjax sample --workdir runs/pixelcnn_cpu --class-label 7 --num 8 --out sevens.npz

Arguments: steps= overrides num_steps; cpu=True the reduced setting of experiments/pixelcnn_mnist
(6 gated layers of 32 channels, batch 32, 660 steps, evaluation at steps 330 and 660); smoke=True a
tiny model (2 layers of 8 channels, 4 steps, evaluation on 8 digits and 10 samples) for tests.

Data: the 4,000 embedded MNIST training digits (`mnist_embedded`) at 28 x 28, binarised in the
task (pixel > 127 is ink); held-out NLL on all 1,000 embedded test digits (100 per class), and
train NLL on the first 1,000 training digits. Model ("mnist" variant): 8 gated layers of 64
channels, first kernel 7 x 7, then 3 x 3, conditioned on the digit class. AdamW lr 1e-3, batch
64, 5k steps, no EMA of the weights (optim.ema_decay 0). Every 1000 steps: a grid of 20
class-conditional samples (two of each digit) at temperature 1, the held-out / train NLL and the
digit classifier's accuracy on 100 class-conditional samples. Not run here (an accelerator setting;
an estimate: minutes on one GPU).

Measured (experiments/pixelcnn_mnist/README.md, 2-core CPU): cpu=True trains at ~0.4 s per step
(0.36-0.78 s with other jobs), 367 s for the whole run including two evaluations, and reaches
68.5 nats (0.126 bits/dim) on the held-out digits, 61.0 on training digits; the digit classifier
reads 30 % of its class-conditional samples as their class.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import pixelcnn


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, cpu=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=64,
                                            image_size=28, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="pixelcnn", **pixelcnn.VARIANTS["mnist"], dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(eval_examples=1000, eval_samples=100))
    c.optim = common.optim(lr=1e-3, ema_decay=0.0)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    # no diffusion sampler settings: a PixelCNN draws its pixels one by one (eval.temperature)
    c.eval = ml_collections.ConfigDict(dict(sample_every_steps=1000, num_samples=20, temperature=1.0))
    if a.cpu:  # the reduced setting of experiments/pixelcnn_mnist (~6 minutes on the 2-core CPU)
        c.num_steps = 660
        c.log_every_steps = 10
        c.data.update(batch_size=32)
        c.model.update(channels=32, num_layers=6)
        c.ckpt.update(save_interval_steps=330)
        c.eval.update(sample_every_steps=330)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8)
        c.model.update(pixelcnn.VARIANTS["tiny"])
        c.task.update(eval_examples=8, eval_samples=10)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=10)  # = eval_samples: one compile
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
