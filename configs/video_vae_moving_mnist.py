"""Causal video KL autoencoder (`genjax.models.video_vae`, MAGVIT-v2 / CogVideoX-style causal 3D
convolutions inflated from the LDM VAE) on one-digit Moving MNIST clips: the frozen video VAE
of `configs/video_dit_moving_mnist.py`.

    genjax train --config configs/video_vae_moving_mnist.py --workdir runs/video_vae_mm
    genjax train --config configs/video_vae_moving_mnist.py:smoke=True --workdir /tmp/vvae_smoke

Data: procedural Moving MNIST, 9 frames of 32 x 32 (T = 1 + 2 * 4). Model: the "tiny" variant
(32, 64, 64 channels; f = 4 in space and 4 in time), so a clip is a 3 x 8 x 8 x 4 latent; loss
L1 + 1e-6 KL. AdamW lr 2e-4, batch 32, EMA 0.999, 20k steps. Every 1000 steps
samples/step_XXXXXX.gif shows 4 test clips followed by their reconstructions.

Hardware: one accelerator. Run time: ESTIMATE, not measured: ~1 GFLOP per clip forward, 20k x 32 x
3 ~ 2e15 FLOPs, minutes on one GPU. Expected result (estimate): reconstructions with the digit
readable and moving, rec_loss below 0.05.
Smoke (`smoke=True`): 5 frames of 32 x 32, channels (8, 16) (f = 2 in space and time), batch 4,
4 steps, float32; seconds on a CPU (tests/train/test_tasks.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import video_vae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 20_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="moving_mnist", split="train", batch_size=32,
                                            image_size=32, num_frames=9, num_digits=1,
                                            num_examples=100_000, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="video_vae", **video_vae.VARIANTS["tiny"], dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(kl_weight=1e-6, rec="l1"))
    c.optim = common.optim(lr=2e-4, ema_decay=0.999, ema_warmup=True)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=8)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, num_frames=5, num_examples=64)
        c.model.update(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False,
                       temporal_downsample=(True,))
        c.optim.update(lr=1e-3, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=4)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
