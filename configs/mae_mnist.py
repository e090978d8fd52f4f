"""MAE (He et al. 2022) on real MNIST digits, or VideoMAE (Tong et al. 2022) on Moving MNIST, task "mae".

    genjax train --config configs/mae_mnist.py --workdir runs/mae_mnist                        # images
    genjax train --config configs/mae_mnist.py:video=True --workdir runs/videomae_mm           # videos
    genjax train --config configs/mae_mnist.py:smoke=True --workdir /tmp/mae_smoke             # seconds, CPU
    genjax sample --workdir runs/mae_mnist --class-label 3 --num 4 --out mae3.npz              # reconstructions

Arguments: video= False (images) / True (videos); smoke= the tiny setting; cpu=True the reduced
setting of experiments/mae_mnist (images: batch 64, 1500 steps; videos: batch 16, 600 steps;
evaluation and probe at the end); steps= overrides num_steps; mask_ratio= overrides the
variant's (0.75 images, 0.9 videos).

Images: the 4,000 embedded MNIST training digits (`mnist_embedded`) at their native 28 x 28 in
[-1, 1], the "mnist" variant (4 x 4 patches -> 49 tokens, 12 visible; encoder 6 blocks of width
128, decoder 2 blocks of width 64), norm-pix loss, AdamW with MAE's weight decay 0.05 and betas
(0.9, 0.95) (Table 8) but lr 1e-3 (MAE's 1.5e-4 * batch / 256 is tuned for 400-1600 epochs; these
runs are ~100), cosine decay after 150 warmup steps, batch 128, 3000 steps, weight EMA 0.999 with
warmup. Evaluation at the end on the 1,000
embedded test digits: held-out masked MSE, and the linear probe on the frozen encoder (trained on
task.probe_train = 4000 training digits) against the same encoder at its random initialisation.
Videos (video=True): procedural Moving MNIST, one digit, 8 frames of 32 x 32, the "moving_mnist"
variant (2 x 4 x 4 tubelets -> 256 tokens, tube masking 0.9 -> 24 visible), batch 32; the probe
reads the digit of 2,000 training clips and is tested on 1,000 test clips.

Hardware: one accelerator for the full setting; experiments/mae_mnist/README.md measures a shorter
run on a 2-core CPU (commands and figures there). Smoke (`smoke=True`): the "tiny" variant, 16 x 16
digits (or 4 frames of 32 x 32 clips with video=True), batch 8, 3 steps, evaluation on 16 test
examples without the probe; ~20 s on a CPU, mostly compilation (tests/train/test_mae_task.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import mae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, video=False, cpu=False, steps=0, mask_ratio=-1.0)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 3000
    c.log_every_steps = 50
    if a.video:
        c.data = common.moving_mnist(32, 100_000, image_size=32, num_frames=8, num_digits=1)
        variant, probe_train = "moving_mnist", 2000
    else:
        c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=128,
                                                image_size=28, channels=1))
        variant, probe_train = "mnist", 4000
    model = {k: v for k, v in mae.VARIANTS[variant].items() if k != "in_channels"}
    c.model = ml_collections.ConfigDict(dict(name="mae", **model, norm_pix_loss=True, dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(eval_examples=1000, probe_train=probe_train, num_classes=10))
    c.optim = common.optim(lr=1e-3, schedule="cosine", warmup_steps=150, weight_decay=0.05, b2=0.95,
                           ema_decay=0.999, ema_warmup=True)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=1)
    c.eval = common.evaluation(sample_every_steps=3000, num_samples=16)
    if a.cpu:  # the reduced setting of experiments/mae_mnist (~10 minutes on a loaded 2-core CPU)
        c.num_steps = 1500 if not a.video else 600
        c.data.update(batch_size=64 if not a.video else 16)
        c.optim.update(warmup_steps=100)
        c.ckpt.update(save_interval_steps=c.num_steps)
        c.eval.update(sample_every_steps=c.num_steps)
    if a.smoke:
        c.num_steps = 3
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=32 if a.video else 16)  # moving_mnist needs >= 28
        if a.video:
            c.data.update(num_frames=4, num_examples=64)
        c.model.update({k: v for k, v in mae.VARIANTS["tiny"].items() if k not in ("in_channels", "mask_ratio")})
        if a.video:
            c.model.update(patch_size=(2, 4, 4))
        c.task.update(eval_examples=16, probe_train=0)  # no probe (tests/train/test_mae_task.py runs it)
        c.optim.update(lr=1e-3, warmup_steps=0)
        c.ckpt.update(save_interval_steps=3)
        c.eval.update(sample_every_steps=3, num_samples=4)
    if a.steps:
        c.num_steps = a.steps
    if a.mask_ratio >= 0:
        c.model.mask_ratio = a.mask_ratio
    c.lock()
    return c
