"""Latent DiT: class-conditional DiT on the latents of a frozen VAE trained by
`configs/vae_mnist.py` (LDM, Rombach et al. 2022; DiT, Peebles & Xie 2023), real MNIST digits.

    genjax train --config configs/vae_mnist.py --workdir runs/vae_mnist
    genjax train --config configs/dit_latent.py:vae=runs/vae_mnist --workdir runs/dit_latent
    genjax train --config configs/dit_latent.py:vae=runs/vae_mnist,latents=cache --workdir runs/dit_latent
    genjax train --config configs/dit_latent.py:smoke=True,vae=/tmp/vae_smoke --workdir /tmp/ldit_smoke

`vae` (-> task.vae) is a trained VAE workdir or a `genjax convert --model vae` folder; it is frozen
(its EMA params). `latents` (-> data.latents): "on_the_fly" encodes each batch inside the train
step; "cache" computes the posterior mean and std once into WORKDIR/latents/train.array_record
(`genjax.data.latent_cache`) and each step draws z = mean + std * eps, the same latents for the
same rng. Samples are DDIM latents decoded by the VAE.

Data: 4,000 embedded MNIST digits at 32 x 32 -> 8 x 8 x 4 latents (f = 4). Model: DiT with patch 2
(16 tokens), width 256, depth 6, 4 heads, 10 classes + null (dropout 0.1), learned sigma; linear
betas, T = 1000. AdamW lr 3e-4, batch 128, EMA 0.9999, 20k steps; DDIM-50, cfg_scale 4.

Hardware: one accelerator. Run time: ESTIMATE, not measured: ~0.1 GFLOPs per latent forward, far
below the pixel DiT; minutes on one GPU (on the fly adds the VAE encoder per step, the cache
removes it). Expected result (estimate): legible digits of the requested class once the VAE
reconstructs well.
Smoke (`smoke=True`, needs `vae=` a smoke VAE from configs/vae_mnist.py:smoke=True): 16 x 16
images, 8 x 8 x 4 latents, DiT depth 1 width 32, batch 8, 4 steps; seconds on a CPU.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.errors import check


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, vae="", latents="on_the_fly", steps=0)
    check(a.latents in ("on_the_fly", "cache"), "latents", a.latents, "must be on_the_fly or cache")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 20_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=128,
                                            image_size=32, channels=1, latents=a.latents))
    c.model = ml_collections.ConfigDict(dict(
        name="dit", patch_size=2, hidden_size=256, depth=6, num_heads=4, num_classes=10,
        class_dropout_prob=0.1, learn_sigma=True, dtype="bfloat16", scan=False, remat="none"))
    c.task = ml_collections.ConfigDict(dict(vae=a.vae))
    c.diffusion = ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=1000,
                                                 prediction_type="epsilon", weighting="none"))
    c.optim = common.optim(lr=3e-4)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=20, cfg_scale=4.0)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(hidden_size=32, depth=1, num_heads=2, dtype="float32")
        c.optim.update(lr=1e-3, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=4, num_sampling_steps=3)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
