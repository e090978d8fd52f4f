"""VAR (next-scale prediction, Tian et al. 2024; `genjax.models.var`) on real MNIST digits, task "var".

    genjax train --config configs/vqvae_mnist.py:var_tokenizer=True --workdir runs/var_tokenizer
    genjax train --config configs/var_mnist.py:vqvae=runs/var_tokenizer --workdir runs/var_mnist
    genjax sample --workdir runs/var_mnist --class-label 3 --num 8 --out threes.npz [--cfg-scale 2]
    genjax train --config configs/var_mnist.py:smoke=True,vqvae=/tmp/vq_smoke --workdir /tmp/var_smoke

Arguments: vqvae= the tokenizer workdir (a "vqvae" run with model.scales; required); cpu=True the
reduced setting of experiments/var_mnist (batch 32, lr 1e-3 cosine with 50 warm-up steps, 600
steps, no weight EMA, the "mnist" variant: width 128, depth 4, 4 heads, 1.25 M parameters;
evaluation at the end), made to follow a
`vqvae_mnist.py:cpu=True,var_tokenizer=True` tokenizer; steps= overrides num_steps; smoke=True.

Data: the 4,000 embedded MNIST training digits (`mnist_embedded`) at 28 x 28 in [-1, 1], with
their labels; the tokenizer's 7 x 7 latents are token maps of sides 1, 2, 3, 4, 5, 7 (104 tokens
from its 128 codes). Model: width 256, depth 8, 8 heads, 10 classes + the null class (label
dropout 0.1, VAR's cond_drop_rate), AdamW lr 2e-4 with weight decay 0.05 (VAR), batch 128, 20k
steps, EMA 0.999. Samples every 2000 steps (cfg_scale 3 reached at the last scale by VAR's
linear ramp, temperature 1, top-k 28 and top-p 0.96: VAR's demo settings, top-k 900 of 4,096
codes scaled to 128) and the digit classifier's accuracy of 200 class-conditional samples with
and without guidance (`tasks/var.py` evaluate); `genjax sample` uses the same settings.

Hardware: one accelerator for the full setting (not run: an estimate, minutes on one GPU, ~2 h on
this 2-core CPU). `cpu=True` measured in experiments/var_mnist/README.md. Smoke (`smoke=True`,
with a `vqvae_mnist.py:smoke=True,var_tokenizer=True` tokenizer: 16 x 16 digits, sides 1, 2, 4, 8):
width 32, depth 2, batch 8, 4 steps, 10 evaluation samples; its samples are noise.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import var


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, cpu=False, vqvae="")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 20_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=128,
                                            image_size=28, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="var", hidden_size=256, depth=8, num_heads=8, mlp_ratio=4.0,
                                             num_classes=10, class_dropout_prob=0.1, dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(vqvae=a.vqvae))
    c.optim = common.optim(lr=2e-4, weight_decay=0.05, ema_decay=0.999, ema_warmup=True)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=2000, max_to_keep=2)
    # VAR's sampling settings (demo: top_k 900 of 4,096 codes, top_p 0.96) with top_k scaled to 128 codes
    c.eval = common.evaluation(sample_every_steps=2000, num_samples=20, cfg_scale=3.0)
    c.eval.update(temperature=1.0, top_k=28, top_p=0.96, cfg_ramp=True, num_eval_samples=200)
    if a.cpu:  # the reduced setting of experiments/var_mnist (minutes on a 2-core CPU)
        c.num_steps = 600
        c.data.update(batch_size=32)
        c.model.update(**var.VARIANTS["mnist"])
        c.optim.update(lr=1e-3, schedule="cosine", warmup_steps=50, ema_decay=0.0, ema_warmup=False)
        c.ckpt.update(save_interval_steps=600)
        c.eval.update(sample_every_steps=600)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(hidden_size=32, depth=2, num_heads=2)
        c.optim.update(lr=1e-3, ema_decay=0.0)
        c.ckpt.update(save_interval_steps=4, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=4, num_eval_samples=10)
    if a.steps:
        c.num_steps = a.steps
        if a.cpu:
            c.ckpt.save_interval_steps = c.eval.sample_every_steps = a.steps
    c.lock()
    return c
