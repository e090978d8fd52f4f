"""2D KL autoencoder (LDM `AutoencoderKL`, the "mnist" variant) on real MNIST digits: the frozen
VAE of the latent DiT (`configs/dit_latent.py`).

    genjax train --config configs/vae_mnist.py --workdir runs/vae_mnist
    genjax train --config configs/vae_mnist.py:smoke=True --workdir /tmp/vae_smoke   # seconds, CPU

Data: the 4,000 embedded MNIST training digits (`mnist_embedded`) resized to 32 x 32, in [-1, 1].
Model: f = 4 (block_out_channels 32, 64, 64; one resnet per level), 4 latent channels, so a digit
is an 8 x 8 x 4 latent; loss L1 + 1e-6 KL (Rombach et al. 2022, the f=4 KL setting, no
discriminator or LPIPS). AdamW lr 2e-4, batch 64, EMA 0.999, 10k steps. Every 1000 steps
samples/step_XXXXXX.png shows 8 test digits followed by their reconstructions. The run logs
`latent_std`, the std of the latents; scaling_factor stays 1.0 here (`model.scaling_factor`).

Hardware: one accelerator, or a CPU for a smaller run. Run time: ESTIMATE, not measured: the
encoder + decoder cost ~0.1 GFLOPs per 32 x 32 digit, 10k steps x 64 x 3 ~ 2e14 FLOPs, a few
minutes on one GPU. Expected result (estimate): reconstructions that read as the same digits,
rec_loss (mean |x - recon| in [-1, 1] units) below 0.05.
Smoke (`smoke=True`): 16 x 16 images, block_out_channels (8, 16) (f = 2), batch 8, 4 steps,
float32; seconds on a CPU (tests/train/test_tasks.py); its reconstructions are blurs.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import vae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 10_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=64,
                                            image_size=32, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="vae", **vae.VARIANTS["mnist"], dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(kl_weight=1e-6, rec="l1"))
    c.optim = common.optim(lr=2e-4, ema_decay=0.999, ema_warmup=True)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=16)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False)
        c.optim.update(lr=1e-3, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=8)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
