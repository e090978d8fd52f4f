"""DALL·E (Ramesh et al. 2021) on real MNIST digits with captions "digit N", task "dalle": a
decoder-only transformer over [byte-tokenized caption ; 7 x 7 dVAE tokens] on a frozen discrete
VAE trained with configs/dvae_mnist.py.

    genjax train --config configs/dvae_mnist.py --workdir runs/dvae_mnist
    genjax train --config configs/dalle_mnist.py:dvae=runs/dvae_mnist --workdir runs/dalle_mnist
    genjax sample --workdir runs/dalle_mnist --prompt "digit 7" --num 8 --out sevens.npz
    genjax train --config configs/dalle_mnist.py:smoke=True,dvae=/tmp/dvae_smoke --workdir /tmp/dalle_smoke

Arguments: dvae= the dVAE workdir (required); clip= a CLIP workdir (configs/clip_mnist.py) for
re-ranking, with rerank= candidates per prompt (eval.rerank; default 1, none); cpu=True the
reduced CPU setting of experiments/dalle_mnist; smoke=True; steps= overrides num_steps.

Data: the 4,000 embedded MNIST training digits at 28 x 28 with their captions "digit N", text
length 16 bytes (bos + 14 bytes + eos; padding positions learned). Model: the "mnist" variant
(D = 128, 4 causal pre-LN blocks, 4 heads), 16 text + 49 image tokens. Loss weights: text 1/8,
image 7/8 (DALL·E Sec. 2.2); captions dropped to "" with probability 0.1 (for guidance).
AdamW lr 1e-3 with cosine decay and 200 warm-up steps, batch 64, 5k steps, EMA 0.999.
Samples: temperature 1, top-k 0, top-p 1 (eval.*), cfg_scale 1 (no guidance); every 1000 steps a
grid of "digit 0" .. "digit 9" and the digit classifier's accuracy over 10 samples per digit.

Hardware: one accelerator for the full setting (an estimate, not measured: minutes on a GPU).
`cpu=True`: batch 32, 1,500 steps, EMA off: ~12 min on the shared 2-core CPU (load ~5); digit
accuracy of prompted samples 0.825 at temperature 1, 0.89 with top-p 0.9, 0.975 with CLIP
re-ranking of 4 candidates (experiments/dalle_mnist/README.md, 200 samples each). Smoke
(`smoke=True`, a dVAE from configs/dvae_mnist.py:smoke=True): D = 32, 1 block, batch 8, 4 steps,
evaluation over 1 sample per digit (tests/train/test_dalle_task.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import dalle


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, cpu=False, dvae="", clip="", rerank=1)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train", batch_size=64,
                                            image_size=28, channels=1))
    c.model = ml_collections.ConfigDict(dict(name="dalle", **dalle.VARIANTS["mnist"], dtype="float32"))
    c.task = ml_collections.ConfigDict(dict(dvae=a.dvae, clip=a.clip, text_length=16, text_loss_weight=1 / 8,
                                            caption_dropout=0.1, eval_per_digit=10))
    c.optim = common.optim(lr=1e-3, schedule="cosine", warmup_steps=200, end_lr_ratio=0.1, ema_decay=0.999)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=20, cfg_scale=1.0)
    c.eval.update(temperature=1.0, top_k=0, top_p=1.0, rerank=a.rerank)
    if a.cpu:  # the reduced setting of experiments/dalle_mnist (minutes on a 2-core CPU)
        c.num_steps = 1500
        c.data.update(batch_size=32)
        c.optim.update(warmup_steps=100, ema_decay=0.0)
        c.ckpt.update(save_interval_steps=1500)
        c.eval.update(sample_every_steps=1500)
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=8, image_size=16)
        c.model.update(hidden_size=32, depth=1, num_heads=2)
        c.task.update(eval_per_digit=1)
        c.optim.update(warmup_steps=0, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=4)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
