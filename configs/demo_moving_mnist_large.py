"""The `genjax demo` pipeline at scale, for one GPU / TPU host: video VAE -> CLIP text tower ->
text-conditioned video DiT on two-digit 64 x 64 Moving MNIST (the canvas of Srivastava et al.
2015), 16 frames, then samples and evaluation: the stages of `configs/demo_moving_mnist.py`, larger.

    genjax demo --config configs/demo_moving_mnist_large.py --workdir runs/demo_large
    genjax demo --config configs/demo_moving_mnist_large.py:steps_scale=0.25 --workdir runs/demo_large_short
    genjax demo --config configs/demo_moving_mnist_large.py --smoke --workdir /tmp/demo_large   # seconds, CPU

Sections (each stage trains in WORKDIR/<stage>/, finished stages are skipped on a re-run):
  vae    causal video VAE, widths (64, 128, 128), 2 res-blocks per level, 4x spatial, causal
         3 x 3 x 3 convolutions (temporal_kernel_size 3: it mixes frames, unlike the CPU demo's
         frame-wise VAE), 1x temporal: 16 x 64 x 64 clips -> latents (16, 16, 16, 4). Not
         downsampled in time (1x), so the DiT sees all 16 latent frames. L1 + 1e-6 KL, batch 32, 20K steps.
  text   CLIP with the text tower of OpenAI's ViT-B/32 (`clip.VARIANTS["ViT-B/32"]`: 12 layers x
         512 wide, 8 heads) over the byte tokenizer (vocab 259, 32 tokens), trained contrastively
         against a ViViT video tower (6 x 384, (2, 8, 8) tubelets) on (clip, caption) pairs; batch
         256, 5K steps; then frozen, its token states (B, 32, 512) condition the DiT. No zero-shot
         evaluation: its "digit N" prompts do not describe two-digit clips.
  dit    video DiT of DiT-B width (768 wide, 12 blocks, 12 heads; joint space-time attention over
         (1, 2, 2) tubelets: 16 x 8 x 8 = 1,024 tokens per clip), text cross-attention, text
         dropout 0.1, frame-conditioning masks (image-to-video); eps, cosine schedule; bfloat16
         compute, scanned blocks rematerialised except their weight matmuls; batch 64, 100K steps
         on latents of 50K training clips (encoded once into the latent cache dit/latents/: the
         posterior mean and std, float32, 6.6 GB). model.attention_impl "auto": cuDNN flash
         attention on NVIDIA GPUs, the Pallas flash kernel on TPU (dense "xla" on a CPU smoke
         run); with it, attention memory is linear in tokens, so longer clips (e.g. 64 frames =
         4,096 tokens, or 64 x 64 latents) fit where dense attention would not. Not measured on an
         accelerator; the CPU measurement of memory against sequence length is in BENCHMARKS.md
         ("Long sequences").
  sample DDIM-50, cfg 4, 8 videos for each of 10 two-digit prompts.

Captions: Moving MNIST's default two-digit caption "digits {d0} and {d1}" (`data.sources.
MovingMnistSource`; the CLIP and video_dit tasks take each clip's caption as it is,
100 distinct captions), so the prompts are two-digit ones. Evaluation (`genjax.eval.evaluate`):
the digit accuracy is defined only for one-digit prompts (`prompted_digit` -> -1 otherwise), so
it is NaN here; eval.json holds the Frechet distance to 500 two-digit test clips in the digit
classifier's feature space, temporal consistency, motion, and the VAE's PSNR / SSIM.

Hardware: one H100 / A100 80 GB, or a TPU v4-8 host (4 chips, data parallel). Run time, ESTIMATE,
not measured (parameters counted with jax.eval_shape, tests/test_configs_scale.py):
  dit   159,853,328 params x 1,024 tokens x 6 = 0.98 TFLOP per clip (XLA's count of the forward,
        attention included, is 246 GFLOP, x 3 = 0.74 TFLOP: adaLN and text projections run once
        per clip, not per token), x 64 clips = 63 TFLOP per step; at 40 % MFU of an H100 (989
        TFLOP/s bf16 dense) = 396 TFLOP/s: 0.16 s/step -> 100K steps ~4.4 h (TPU v4-8, 4 x 275
        TFLOP/s: 0.14 s/step, ~4 h; the rematerialised attention adds ~5 %).
  vae   15.0 M params; XLA counts 431 GFLOP per 16 x 64 x 64 clip forward, x 3 x 32 clips = 41 TFLOP
        per step: 0.10 s/step -> 20K steps ~0.6 h at 40 % MFU (3D convolutions rarely reach it:
        budget 1-2 h).
  text  text tower 38.0 M params x 32 tokens + video tower 10.7 M x 512 tokens, x 6 x 256 pairs =
        10 TFLOP per step: 5K steps ~2 min.
  Encoding 50K clips (~11 PFLOP) and sampling 80 videos: minutes. In all ~5-7 h on one H100.
Expected result (ESTIMATE, not measured): VAE PSNR above the CPU demo's 26.0 dB on test clips;
samples show two digits moving; Frechet distance well below that of the untrained model.
Smoke (`smoke=True`): 32 x 32 canvas, 4 frames, 8-wide VAE, 1-layer 32-wide CLIP and DiT,
3 steps per stage, one prompt; seconds on a CPU (tests/test_configs_scale.py).
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import clip

PROMPTS = ("digits 0 and 1", "digits 2 and 3", "digits 4 and 5", "digits 6 and 7", "digits 8 and 9",
           "digits 3 and 7", "digits 1 and 8", "digits 9 and 4", "digits 5 and 2", "digits 6 and 0")


def _data(batch_size: int, num_examples: int) -> ml_collections.ConfigDict:
    return common.moving_mnist(batch_size, num_examples, image_size=64, num_frames=16,
                               num_digits=2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps_scale=1.0)

    def steps(n):
        return common.scaled_steps(n, a.steps_scale)

    vae = ml_collections.ConfigDict()
    vae.seed = 0
    vae.num_steps = steps(20_000)
    vae.log_every_steps = 100
    vae.data = _data(32, 100_000)
    vae.model = ml_collections.ConfigDict(dict(
        name="video_vae", in_channels=1, out_channels=1, block_out_channels=(64, 128, 128),
        layers_per_block=2, latent_channels=4, norm_num_groups=32, mid_block_attention=True,
        temporal_downsample=(False, False), temporal_kernel_size=3, scaling_factor=1.0, dtype="bfloat16"))
    vae.task = ml_collections.ConfigDict(dict(kl_weight=1e-6, rec="l1"))
    vae.optim = common.optim(lr=2e-4, schedule="cosine", warmup_steps=500, end_lr_ratio=0.1,
                             ema_decay=0.999, ema_warmup=True)
    vae.mesh = common.mesh()
    vae.ckpt = common.ckpt(save_interval_steps=2_000, max_to_keep=2)
    vae.eval = common.evaluation(sample_every_steps=5_000, num_samples=8)

    text = ml_collections.ConfigDict()
    text.seed = 0
    text.num_steps = steps(5_000)
    text.log_every_steps = 50
    text.data = _data(256, 100_000)
    b32 = clip.VARIANTS["ViT-B/32"]
    text.model = ml_collections.ConfigDict(dict(
        name="clip", embed_dim=b32["embed_dim"], text_width=b32["text_width"],
        text_layers=b32["text_layers"], text_heads=b32["text_heads"], activation=b32["activation"],
        vocab_size=259, context_length=32,  # the byte tokenizer, not OpenAI's BPE
        image_size=(64, 64), patch_size=(8, 8), in_channels=1, vision_width=384, vision_layers=1,
        vision_heads=6, video_patch_size=(2, 8, 8), video_max_grid=(8, 8, 8), video_layers=6,
        video_temporal_layers=1, dtype="bfloat16"))  # image tower: 1 layer, unused by video CLIP
    text.optim = common.optim(lr=5e-4, schedule="cosine", warmup_steps=500, weight_decay=0.1,
                              ema_decay=0.0)
    text.mesh = common.mesh()
    text.ckpt = common.ckpt(save_interval_steps=1_000, max_to_keep=1)
    text.eval = common.evaluation(sample_every_steps=0, num_samples=8)

    dit = ml_collections.ConfigDict()
    dit.seed = 0
    dit.num_steps = steps(100_000)
    dit.log_every_steps = 100
    dit.data = _data(64, 50_000)
    dit.data.latents = "cache"
    dit.model = ml_collections.ConfigDict(dict(
        name="video_dit", patch_size=(1, 2, 2), hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
        attention="joint", pos_embed="sincos", text_dropout_prob=0.1, attention_impl="auto",
        dtype="bfloat16", scan=True, remat="dots_with_no_batch_dims_saveable"))
    dit.task = ml_collections.ConfigDict(dict(vae="", text_encoder="", latent_scale=0.0,
                                              text_length=text.model.context_length))
    dit.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_timesteps=1000, prediction_type="epsilon", weighting="none",
        frame_mask_probs={"none": 0.8, "first": 0.2}))
    dit.optim = common.optim(lr=2e-4, schedule="cosine", warmup_steps=1_000, end_lr_ratio=0.1,
                             ema_decay=0.9999, ema_warmup=True)
    dit.mesh = common.mesh()
    dit.ckpt = common.ckpt(save_interval_steps=5_000, max_to_keep=2)
    dit.eval = common.evaluation(sample_every_steps=0, num_samples=8)

    sample = ml_collections.ConfigDict(dict(
        prompts=PROMPTS, samples_per_prompt=8, sampler="ddim", num_steps=50, cfg_scale=4.0,
        seed=0, num_reference=500))

    if a.smoke:
        for stage in (vae, text, dit):
            stage.num_steps = 3
            stage.log_every_steps = 1
            stage.data.update(batch_size=8, num_examples=16, image_size=32, num_frames=4)
            stage.ckpt.update(save_interval_steps=3, async_save=False)
            stage.optim.warmup_steps = 1
        vae.model.update(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         mid_block_attention=False)
        vae.eval.sample_every_steps = 0
        text.model.update(embed_dim=32, text_width=32, text_layers=1, text_heads=2, image_size=(32, 32),
                          vision_width=32, vision_heads=2, video_max_grid=(2, 4, 4), video_layers=1)
        dit.model.update(hidden_size=32, depth=1, num_heads=2)
        sample.update(prompts=("digits 3 and 7",), samples_per_prompt=2, num_steps=3, num_reference=0)

    c = ml_collections.ConfigDict(dict(vae=vae, text=text, dit=dit, sample=sample))
    c.lock()
    return c
