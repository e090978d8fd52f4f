"""DALL·E's discrete VAE (`genjax.models.dvae`, the "mnist" variant) on real MNIST digits, task
"dvae": the tokenizer of configs/dalle_mnist.py.

    genjax train --config configs/dvae_mnist.py --workdir runs/dvae_mnist
    genjax train --config configs/dvae_mnist.py:cpu=True --workdir runs/dvae_cpu        # minutes, CPU
    genjax train --config configs/dvae_mnist.py:smoke=True --workdir /tmp/dvae_smoke     # seconds, CPU

Arguments: cpu=True the reduced CPU setting of experiments/dalle_mnist; smoke=True; steps=
overrides num_steps (and the annealing lengths, which follow it).

Data: the 4,000 embedded MNIST training digits (`mnist_embedded`) at 28 x 28 in [-1, 1];
held-out evaluation on all 1,000 embedded test digits. Model: f = 4 (block_out_channels 32, 64,
64; one resnet per level), so a digit is 7 x 7 = 49 tokens over 128 codes of width 32.
Loss (tasks/dvae.py): L2 reconstruction + beta KL(q || uniform) per pixel; tau annealed 1 -> 1/16
over the whole run and beta 0 -> task.kl_weight over its first tenth, cosine curves (DALL·E
App. A.2's schedule shape, compressed to the run). AdamW lr 1e-3, batch 64, 5k steps, no EMA of
the weights (the frozen dVAE of dalle_mnist is the trained one).

Hardware: one accelerator for the full setting (an estimate: minutes on a GPU, not measured).
`cpu=True`: block_out_channels (16, 32, 32), batch 32, 600 steps: 488 s on the shared 2-core CPU
(load 5-7), held-out PSNR 19.4 dB, SSIM 0.80, 106 of 128 codes used (experiments/dalle_mnist). Smoke (`smoke=True`): 16 x 16 digits, f = 2, 16 codes, batch 8,
4 steps, evaluation on 8 test digits (tests/train/test_dalle_task.py); its reconstructions are blurs.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import dvae


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, cpu=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=64,
                                            image_size=28, channels=1))
    model = {k: v for k, v in dvae.VARIANTS["mnist"].items() if k not in ("in_channels", "out_channels")}
    c.model = ml_collections.ConfigDict(dict(name="dvae", **model, dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(rec="l2", kl_weight=0.1, kl_warmup_steps=500,
                                            temperature_start=1.0, temperature_end=1 / 16,
                                            temperature_steps=5000, temperature_schedule="cosine",
                                            eval_examples=1000))
    c.optim = common.optim(lr=1e-3, ema_decay=0.0)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=16)
    if a.cpu:  # the reduced setting of experiments/dalle_mnist (minutes on a 2-core CPU)
        c.num_steps = 600
        c.data.update(batch_size=32)
        c.model.update(block_out_channels=(16, 32, 32), norm_num_groups=8)
        c.ckpt.update(save_interval_steps=600)
        c.eval.update(sample_every_steps=600)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(block_out_channels=(8, 16), norm_num_groups=4, num_codes=16, code_dim=8)
        c.task.update(eval_examples=8)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=8)
    if a.steps:
        c.num_steps = a.steps
    c.task.update(temperature_steps=c.num_steps, kl_warmup_steps=c.num_steps // 10)
    c.lock()
    return c
