"""DiT-XL/2 on ImageNet 256 x 256: the setup of Peebles & Xie 2023 ("Scalable Diffusion Models
with Transformers", Sec. 5 and Table 4), class-conditional latent diffusion on the frozen SD VAE.

    # 1. the data, once (needs the two ILSVRC2012 tars from image-net.org in MANUAL; TFDS needs
    #    TensorFlow installed to prepare it, not to read it):
    tfds build imagenet2012 --manual_dir=MANUAL --data_dir=~/tensorflow_datasets --file_format=array_record
    # 2. the VAE, once: stabilityai/sd-vae-ft-ema (or sd-vae-ft-mse) from the Hub, in diffusers format:
    genjax convert --from diffusers --model vae PATH/sd-vae-ft-ema --out runs/sd-vae-ft-ema
    # 3. train (resumes from runs/dit_xl2/checkpoints after a restart or preemption):
    genjax train --config configs/dit_imagenet256.py:vae=runs/sd-vae-ft-ema --workdir runs/dit_xl2
    #    latents cached once (WORKDIR/latents, ~42 GB of float32 mean + std) instead of encoded per step:
    genjax train --config configs/dit_imagenet256.py:vae=runs/sd-vae-ft-ema,latents=cache --workdir runs/dit_xl2
    #    data elsewhere than ~/tensorflow_datasets: --config.data.data_dir=/data/tfds

Args: `vae` (-> task.vae) a `genjax convert --model vae` folder, frozen; its config carries the
latent scaling factor (0.18215 for the SD VAEs). `latents` "on_the_fly" (default: each batch is
encoded inside the train step, z ~ q(z | x), as DiT's train.py) or "cache" (`genjax.data.
latent_cache`: posterior mean and std computed once; the random flip is then drawn once per image
when the cache is filled). `steps` overrides num_steps. `fsdp` shards params and optimizer state
over that many devices (mesh (data, fsdp) = (-1, fsdp)); 1 is pure data parallelism.

Setup (paper -> fields): ImageNet train split (1,281,167 images), ADM center crop to 256 x 256
(data.crop "adm_center", `transforms.adm_center_crop`) and random horizontal flips (data.
random_flip); SD VAE f = 8 -> 32 x 32 x 4 latents; DiT-XL/2: hidden 1152, depth 28, 16 heads,
patch 2 (256 tokens), 1000 classes + null (label dropout 0.1), learned sigma (L_simple + L_vlb,
Nichol & Dhariwal 2021), 674,834,720 parameters (675 M with the fixed positional table; Table 4:
675 M, 118.6 Gflops); linear betas 1e-4 .. 0.02, T = 1000, eps-prediction; AdamW, constant lr 1e-4,
no weight decay, no warmup, no gradient clipping, global batch 256, EMA 0.9999; 400K steps
(Table 4). Compute in bfloat16 with float32 params, blocks under `nn.scan` (one compiled block),
no rematerialisation: per device on 8 x 80 GB (batch 32) the float32 params, EMA and Adam moments
plus gradients take ~13.5 GB and the saved activations ~15 GB (estimate: ~60 KB per token per
block, float32 attention probabilities included). On a TPU v4-8 (4 chips of 32 GB, batch 64 each)
use fsdp=4 and --config.model.remat=dots_with_no_batch_dims_saveable. Attention: model.attention_impl
"auto" runs cuDNN flash attention on NVIDIA GPUs and the Pallas flash kernel on TPU (the dense
"xla" on a CPU smoke run), so the attention probabilities are never stored: the ~15 GB above is an
upper bound (256 tokens, so attention is a small part of it either way; not measured on an
accelerator). Samples every 10K steps:
DDPM-250 with classifier-free guidance 1.5 (the paper's FID-50K sampler), EMA weights.

Hardware: 8 x H100 / A100 80 GB (one host) or a TPU v4-8. Run time, ESTIMATE, not measured:
DiT-XL/2 is 118.9 GMACs per forward at 256 x 256 (genjax's XLA count, Table 4: 118.6) = 238 GFLOP;
forward + backward ~3x = 714 GFLOP per image, x 256 = 183 TFLOP per step. At 40 % MFU:
8 x H100 (989 TFLOP/s bf16 dense each) 3.2 PFLOP/s -> 0.058 s/step -> 400K steps ~6.4 h;
8 x A100 (312) -> 0.18 s/step -> ~20 h; TPU v4-8 (4 chips x 275) -> 0.42 s/step -> ~46 h. On the
fly, the SD VAE encoder adds 269 GFLOP per image (XLA count) = 69 TFLOP per step (+38 %: ~8.8 h on
8 x H100); the cache costs it once (1.28 M images, minutes of accelerator time, but one pass of
JPEG decoding). The input pipeline must decode ~4,400 JPEGs/s on the H100 host to keep up.
Expected result (the paper's, not reproduced here): FID-50K 19.47 at 400K steps without guidance
(Table 4); 9.62 unguided and 2.27 with cfg 1.5 after 7M steps (Table 2). FID needs 50K samples and
ADM's evaluation suite (reference batch VIRTUAL_imagenet256_labeled.npz), which genjax does not
include. As DiT's sample.py, the samples draw with the learned variance (DDPM, learned_range) and
guide the first 3 of the 4 latent channels (eval.guide_channels = 3, DiT's `forward_with_cfg`;
0 guides all 4, as diffusers' DiTPipeline).
Smoke (`smoke=True`, needs `vae=` any converted VAE; tests/train/test_imagenet_config.py uses
`tfds.testing.mock_data` and a random-weight diffusers AutoencoderKL): 32 x 32 images, DiT depth 2
width 32 (scanned), batch 4, float32, 2 steps, DDPM-3 samples; seconds on a CPU.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.errors import check


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, vae="", latents="on_the_fly", steps=0, fsdp=1)
    check(a.latents in ("on_the_fly", "cache"), "latents", a.latents, "must be on_the_fly or cache")
    check(a.fsdp >= 1, "fsdp", a.fsdp, "must be >= 1")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 400_000
    c.log_every_steps = 100
    c.data = ml_collections.ConfigDict(dict(
        dataset="imagenet2012", split="train", data_dir="", batch_size=256, image_size=256,
        channels=3, crop="adm_center", random_flip=True, latents=a.latents))
    c.model = ml_collections.ConfigDict(dict(
        name="dit", patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
        num_classes=1000, class_dropout_prob=0.1, learn_sigma=True, dtype="bfloat16", scan=True,
        remat="none", attention_impl="auto"))
    c.task = ml_collections.ConfigDict(dict(vae=a.vae))
    c.diffusion = ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=1000,
                                                 prediction_type="epsilon", weighting="none"))
    c.optim = common.optim(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.0,
                           grad_clip_norm=0.0, ema_decay=0.9999, ema_warmup=False)
    c.mesh = common.mesh(data=-1, fsdp=a.fsdp)
    c.ckpt = common.ckpt(save_interval_steps=10_000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=10_000, num_samples=16, sampler="ddpm",
                               num_sampling_steps=250, cfg_scale=1.5)
    c.eval.guide_channels = 3  # DiT guides 3 of the 4 latent channels (models.py forward_with_cfg)
    if a.smoke:
        c.num_steps = 2
        c.log_every_steps = 1
        c.data.update(batch_size=4, image_size=32)
        c.model.update(hidden_size=32, depth=2, num_heads=2, dtype="float32")
        c.ckpt.update(save_interval_steps=2, max_to_keep=1, async_save=False)
        c.eval.update(sample_every_steps=2, num_samples=2, num_sampling_steps=3)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
