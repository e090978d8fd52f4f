"""ViViT video classification of the digit in one-digit Moving MNIST (a smoke task for ViViT).

Task "vivit" (`genjax/tasks/vivit.py`): softmax cross-entropy on the digit label, test accuracy
on eval.num_samples held-out clips every eval.sample_every_steps.

    genjax train --config configs/vivit_moving_mnist.py --workdir runs/vivit_mm
    genjax train --config configs/vivit_moving_mnist.py:attention=joint --workdir runs/vivit_mm_joint
    genjax train --config configs/vivit_moving_mnist.py:smoke=True --workdir /tmp/vivit_smoke
    genjax train --config configs/vivit_moving_mnist.py:pretrained=runs/videomae_mm --workdir runs/vivit_mae

pretrained=WORKDIR: fine-tune from an MAE run (configs/mae_mnist.py, task "mae"): task.pretrained
= WORKDIR, joint attention and sin-cos positions, and the encoder sizes and tubelet of that run's
config.json (its `tubelet_embed` and `encoder` params initialise the classifier's).

Data: procedural Moving MNIST (`genjax.data.sources.MovingMnistSource`), one real MNIST digit
bouncing in a 64 x 64 canvas for 16 frames, pixels scaled to [-1, 1]; the label is the digit.
Model: ViViT-Ti (Arnab et al. 2021; width 192, depth 12, 3 heads) with 8 x 8 x 2 tubelets
(-> an 8 x 8 x 8 grid, 512 tokens), learned factorised (t, h, w) positions, mean pooling;
`attention` = "joint" (model 1) | "factorised_encoder" (model 2, 4 temporal layers) |
"factorised_self_attention" (model 3). AdamW lr 1e-3, cosine decay after 500 warmup steps,
weight decay 0.05, batch 128, 5000 steps.

Hardware: one accelerator (a single GPU or TPU core), bf16 compute. Run time (ESTIMATE, not
measured here): model 2 costs ~6 GFLOPs forward per clip, so 5000 steps x 128 clips x ~3
(forward + backward) ~ 1.2e16 FLOPs, a few minutes on one A100 / H100 at 20-40 % MFU.
Expected result (estimate): digit accuracy on the test split above 95 % (a ViT of this size
reads MNIST digits at ~98 %; the motion only adds translation).
Smoke (`smoke=True`): the "smoke" variant (~7k params; 32 x 32 canvas, 8 frames, 4 x 4 x 4
tubelet grid), batch 16, 400 steps of Adam lr 3e-3, float32. Measured on 2 CPU cores: ~10 s
including compilation; train accuracy over the last 50 steps ~0.6 (chance 0.1), loss
2.3 -> ~1.1.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.errors import check
from genjax.models import vivit


# The MAE model fields that shape its encoder (`genjax.models.mae.MAE`), copied by pretrained=.
MAE_ENCODER = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "scan")


def _from_mae(c: ml_collections.ConfigDict, path: str) -> None:
    """Set c.task.pretrained = path, joint attention, sin-cos positions and the MAE's encoder sizes."""
    from genjax.io import checkpoint

    saved = checkpoint.read_config(path).model
    c.task = ml_collections.ConfigDict(dict(pretrained=path))
    c.model.update(attention="joint", pos_embed="sincos",
                   **{k: tuple(saved[k]) if k == "patch_size" else saved[k] for k in MAE_ENCODER if k in saved})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, attention="factorised_encoder", pretrained="")
    check(a.attention in vivit.ATTENTION_KINDS, "attention", a.attention, f"must be one of {vivit.ATTENTION_KINDS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5000
    c.log_every_steps = 50

    c.data = ml_collections.ConfigDict(dict(
        dataset="moving_mnist", split="train", eval_split="test", batch_size=128, image_size=64,
        num_frames=16, num_digits=1, num_examples=100_000, channels=1))
    # The variant is resolved here into explicit sizes, each overridable (--config.model.num_layers=6).
    c.model = ml_collections.ConfigDict(dict(
        name="vivit", **{**vivit.VARIANTS["Ti"], "patch_size": (2, 8, 8), "max_grid": (8, 8, 8)},
        in_channels=1, num_classes=10, attention=a.attention, pos_embed="learned", pool="mean",
        dtype="bfloat16", scan=False, remat="none"))
    if a.pretrained:
        _from_mae(c, a.pretrained)
    c.optim = common.optim(lr=1e-3, schedule="cosine", warmup_steps=500, weight_decay=0.05, ema_decay=0.999)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=512)

    if a.smoke:
        c.num_steps = 400
        c.log_every_steps = 10
        c.data.update(batch_size=16, image_size=32, num_frames=8, num_examples=2048)
        c.model.update(**vivit.VARIANTS["smoke"], dtype="float32")
        if a.pretrained:
            _from_mae(c, a.pretrained)
        c.optim.update(lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0,
                       ema_warmup=True)  # EMA decay (1 + n) / (10 + n): ~0.98 at step 400
        c.ckpt.update(save_interval_steps=200, max_to_keep=1)
        c.eval.update(sample_every_steps=400, num_samples=64)
    c.lock()
    return c
