"""Pixel-space DDPM U-Net (Ho et al. 2020; diffusers `UNet2DModel` layout), class-conditional
with classifier-free guidance, on real MNIST digits.

    genjax train --config configs/unet_mnist.py --workdir runs/unet_mnist
    genjax train --config configs/unet_mnist.py:unconditional=True --workdir runs/unet_mnist_uncond
    genjax train --config configs/unet_mnist.py:smoke=True --workdir /tmp/unet_smoke   # seconds, CPU

Data: the 4,000 embedded MNIST training digits, 28 x 28 x 1 in [-1, 1]. Model: 3 levels
(64, 128, 128 channels; attention at 14 x 14 and in the middle), 2 resnets per level, a learned
class table of 10 + 1 (null) rows, label dropout 0.1 (Ho & Salimans 2022); linear betas, T = 1000,
epsilon prediction, L_simple (`objective=flow`: rectified flow, Euler samples). AdamW lr 2e-4, batch 128, EMA 0.9999, 20k steps; DDIM-50 samples
with cfg_scale 3 every 1000 steps.

Hardware: one accelerator. Run time: ESTIMATE, not measured: ~1.5 GFLOPs per forward, 20k x 128
x 3 ~ 1.2e16 FLOPs, 15-30 min on one A100 / H100. Expected result (estimate): legible digits of
the requested class; loss around 0.03.
Smoke (`smoke=True`): 16 x 16 images, 2 levels of (8, 16) channels without attention, batch 8,
4 steps, float32; seconds on a CPU (tests/train/test_tasks.py); its samples are noise.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, unconditional=False, steps=0, objective="eps")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 20_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=128,
                                            image_size=28, channels=1))
    c.model = ml_collections.ConfigDict(dict(
        name="unet", block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        attention_head_dim=None, norm_num_groups=32, dropout=0.1, dtype="bfloat16"))
    c.task = ml_collections.ConfigDict(dict(num_classes=0 if a.unconditional else 10, class_dropout_prob=0.1))
    c.diffusion = common.diffusion(a.objective)  # objective=flow: rectified flow
    c.optim = common.optim(lr=2e-4)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=20, cfg_scale=3.0,
                               sampler="euler" if a.objective == "flow" else "ddim")
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                       dropout=0.0, dtype="float32")
        c.optim.update(lr=1e-3, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=4, num_sampling_steps=3)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
