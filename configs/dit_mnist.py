"""Class-conditional pixel-space DiT on real MNIST digits (the 4,000 embedded training digits).

    genjax train --config configs/dit_mnist.py --workdir runs/dit_mnist
    genjax train --config configs/dit_mnist.py:smoke=True --workdir /tmp/dit_smoke   # seconds, CPU

Model: DiT-S/2 (Peebles & Xie 2023; depth 12, width 384, 6 heads) on 28x28x1 images in [-1, 1]
(patch 2 -> 14x14 = 196 tokens; 28 is divisible by 2 and 4, so no padding or resizing), 10
classes + the null class (label dropout 0.1), learned variance (Improved DDPM hybrid loss), linear
beta schedule with T = 1000, epsilon prediction; AdamW lr 1e-4, batch 128, EMA 0.9999;
every 1000 steps a DDIM-50 sample grid with cfg_scale 4 from the EMA weights.

Hardware: one accelerator (a single GPU or TPU core is plenty; bf16 compute). The non-smoke run
time is an ESTIMATE, not measured here: DiT-S/2 at 196 tokens is ~1.5 GFLOPs per image forward,
so 20k steps x 128 images x ~3 (fwd + bwd) ~ 1.2e16 FLOPs, about 15-30 min on one A100/H100 or
TPU v4 core at 20-40 % MFU. Expected result (estimate): recognisable digits of the requested
class in `samples/step_020000.png`, training loss around 0.03-0.05 (eps-MSE + VB).
`objective=flow` trains rectified flow instead (velocity target, logit-normal timesteps, no
learned variance; `configs/common.py:diffusion`) and samples with Euler; `objective=v` v-prediction.
`mdt=True` trains the Masked Diffusion Transformer instead (task "mdt", `genjax.models.mdt`; Gao
et al. 2023, MDTv2): the same sizes with half the blocks as decoder (decode_layers None = depth // 2 rounded down to
an even encoder, as the official S/2 flags), one side-interpolator block, 30 % of the tokens masked in the second,
masked branch of every step (experiments/mdt_mnist compares it with the DiT at equal compute).
`packed=True` trains NaViT-packed (Dehghani et al. 2023): every image at its own size and aspect,
resized down only to fit data.packing.seq_len patches, packed with others into data.batch_size
sequences (one compiled step for every size; `genjax.tasks.dit`). MNIST digits are all 28 x 28;
point it at images of mixed sizes with
    genjax train --config configs/dit_mnist.py:packed=True,objective=flow --workdir runs/dit_packed \
        --config.data.dataset=image_folder:/path/to/root --config.data.channels=3
(an ImageFolder `root/class_name/x.png`, read as RGB; labels from the class folders, at most
model.num_classes). Learned variance is off (no packed VLB); samples at data.image_size.
Smoke (`smoke=True`): depth 2, width 32, patch 4, batch 16, 30 steps, float32; runs in seconds on
a CPU (the tests use it); its samples are noise.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.errors import check
from genjax.models import dit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps=0, variant="S/2", objective="eps", packed=False, mdt=False)
    check(not (a.mdt and a.packed), "mdt", a.mdt, "cannot be combined with packed=True (MDT has one input size)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 20_000
    c.log_every_steps = 50

    c.data = ml_collections.ConfigDict(dict(dataset="mnist_embedded", split="train",
                                            batch_size=128, image_size=28, channels=1))
    check(a.variant in dit.VARIANTS, "variant", a.variant, f"must be one of {list(dit.VARIANTS)}")
    # The variant is resolved here into explicit sizes, each overridable (--config.model.depth=4).
    c.model = ml_collections.ConfigDict(dict(
        name="dit", **dit.VARIANTS[a.variant], num_classes=10, class_dropout_prob=0.1,
        learn_sigma=a.objective != "flow" and not a.packed, dtype="bfloat16", scan=False, remat="none"))
    if a.mdt:  # MDTv2 (Gao et al. 2023): DiT blocks + long skips + side-interpolator, 30 % masked
        c.model.update(name="mdt", decode_layers=ml_collections.config_dict.placeholder(int), side_layers=1,
                       mask_ratio=0.3)  # decode_layers None: depth // 2
        del c.model["scan"], c.model["remat"]
    c.diffusion = common.diffusion(a.objective)
    c.optim = common.optim(lr=1e-4)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=3)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=16, num_sampling_steps=50,
                               cfg_scale=4.0, sampler="euler" if a.objective == "flow" else "ddim")

    if a.smoke:
        c.num_steps = 30
        c.log_every_steps = 1
        c.data.batch_size = 16
        c.model.update(patch_size=4, hidden_size=32, depth=2, num_heads=2, dtype="float32")
        c.optim.update(lr=1e-3, ema_decay=0.99)
        c.ckpt.update(save_interval_steps=10, max_to_keep=2)
        c.eval.update(sample_every_steps=0, num_samples=8, num_sampling_steps=5)
    if a.packed:  # 28 x 28 at patch 2 is 196 tokens: two digits per 512-token sequence, 64 per 16 sequences
        c.data.update(batch_size=16, packing=dict(seq_len=512, max_per_seq=8))
        if a.smoke:  # patch 4: a 28 x 28 digit is 49 tokens
            c.data.update(batch_size=2, packing=dict(seq_len=128, max_per_seq=6, lookahead=16))
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
