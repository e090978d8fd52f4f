"""VQ-VAE (`genjax.models.vqvae`, the "mnist" variant) on real MNIST digits, task "vqvae".

    genjax train --config configs/vqvae_mnist.py --workdir runs/vqvae_mnist                  # EMA + restarts
    genjax train --config configs/vqvae_mnist.py:codebook=loss --workdir runs/vqvae_loss     # eq. 3 codebook loss
    genjax train --config configs/vqvae_mnist.py:smoke=True --workdir /tmp/vqvae_smoke       # seconds, CPU

Arguments: codebook= "ema" (default: EMA codebook, decay 0.99, van den Oord et al. 2017 App. A.1)
or "loss" (codebook term of eq. 3); restart= dead-code restart threshold in vectors per batch
(default 1.0 as Jukebox with "ema"; 0 disables; must be 0 with "loss"); steps= overrides num_steps;
cpu=True the reduced CPU setting of experiments/vqvae_mnist (channels 16, 32, 32 without the
mid-block attention, batch 32, lr 1e-3, 300 steps, evaluation at the end); var_tokenizer=True
VAR's multi-scale residual tokenizer (Tian et al. 2024; `var.MultiScaleQuantizer`, quant_resi
0.5, 4 phi convs) with the eq. 3 codebook (no EMA, no restarts) on 28 x 28 digits (the size the
digit classifier reads): 7 x 7 latents in token maps of sides (1, 2, 3, 4, 5, 7), 104 tokens;
with smoke=True 16 x 16 digits, 8 x 8 latents, sides (1, 2, 4, 8). The tokenizer of configs/var_mnist.py.

Data: the 4,000 embedded MNIST training digits (`mnist_embedded`) resized to 32 x 32 in [-1, 1];
held-out evaluation on all 1,000 embedded test digits (100 per class). Model: f = 4
(block_out_channels 32, 64, 64; one resnet per level), 128 codes of width 8, so a digit is 8 x 8
codes; beta 0.25, L2 reconstruction.
AdamW lr 2e-4, batch 64, 10k steps. No EMA of the weights (optim.ema_decay 0): the samples and the
evaluation use the trained encoder, the one the EMA codebook tracked. Every 1000 steps
samples/step_XXXXXX.png shows 8 test digits and their reconstructions, and metrics.jsonl gets
psnr, ssim, eval_perplexity and eval_codes_used on the 1,000 held-out digits.

Hardware: one accelerator for the full setting. Measured only on a 2-core CPU shared with other
jobs (load 5-10): the full setting ran at ~6 s per step (8 steps seen, then stopped: 10k steps
would take ~17 h there; on one GPU, an estimate, minutes); `cpu=True` at 0.4-0.75 s per step,
176-292 s per 300-step run including ~40 s of start-up and compilation, reaching held-out PSNR
26.1-26.7 dB, SSIM 0.92-0.94, all 128 codes used (EMA + restarts) vs 24.0-24.3 dB, 0.90, 73
codes (codebook=loss) (experiments/vqvae_mnist/README.md). Expected result of the full setting
(estimate, not measured): higher PSNR than the cpu=True runs, with most of the codebook in use.
Smoke (`smoke=True`): 16 x 16 digits, block_out_channels (8, 16) (f = 2), 32 codes of width 4,
batch 8, 4 steps, evaluation on 8 test digits; ~35 s through trainer.main on the loaded 2-core
CPU, mostly compilation (tests/train/test_vqvae_task.py); its reconstructions are blurs.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import vqvae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, codebook="ema", restart=-1.0, cpu=False, var_tokenizer=False)
    if a.var_tokenizer:
        a.codebook = "loss"
    restart = (1.0 if a.codebook == "ema" else 0.0) if a.restart < 0 else a.restart
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 10_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=64,
                                            image_size=32, channels=1))
    model = {k: v for k, v in vqvae.VARIANTS["mnist"].items() if k not in ("in_channels", "out_channels")}
    c.model = ml_collections.ConfigDict(dict(name="vqvae", **model, beta=0.25, ema_decay=0.99,
                                             dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(codebook=a.codebook, rec="l2", restart_threshold=restart,
                                            eval_examples=1000))
    c.optim = common.optim(lr=2e-4, ema_decay=0.0)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=16)
    if a.cpu:  # the reduced setting of experiments/vqvae_mnist (a few minutes on a 2-core CPU)
        c.num_steps = 300
        c.data.update(batch_size=32)
        c.model.update(block_out_channels=(16, 32, 32), norm_num_groups=8, mid_block_attention=False)
        c.optim.update(lr=1e-3)
        c.ckpt.update(save_interval_steps=300)
        c.eval.update(sample_every_steps=300)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(block_out_channels=(8, 16), norm_num_groups=4, mid_block_attention=False,
                       latent_channels=4, num_codes=32)
        c.task.update(eval_examples=8)
        c.optim.update(lr=1e-3)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=8)
    if a.var_tokenizer:
        c.data.update(image_size=16 if a.smoke else 28)
        c.model.update(scales=(1, 2, 4, 8) if a.smoke else (1, 2, 3, 4, 5, 7), quant_resi=0.5, num_phi=4)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
