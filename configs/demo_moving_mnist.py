"""The staged text-to-video demo (`genjax demo`): video VAE -> text encoder (CLIP) -> video DiT on
one-digit Moving MNIST made from real MNIST digits, in the latent-diffusion order (Rombach et al.
2022; Sora technical report, Brooks et al. 2024).

    make demo                                  # = genjax demo --workdir runs/demo
    genjax demo --steps-scale 4 --workdir runs/demo_x4   # 4x the training steps of every stage
    genjax demo --smoke --workdir /tmp/demo    # seconds-scale sizes (tests/test_demo.py)

Sections (each stage trains in WORKDIR/<stage>/; a finished stage is skipped on a re-run):
  vae    a `genjax train` config (model.name "video_vae"): causal video KL autoencoder, 4x spatial,
         1x temporal with temporal kernel 1 (frame-wise: a 3 x 3 x 3 causal conv costs 3x on CPU,
         measured 10 vs 3.6 CPU s per batch of 16 clips), so it trains on single frames and
         encodes 8 frames of 32 x 32 into latents (8, 8, 8, 4); L1 + 1e-6 KL.
  text   a `genjax train` config (model.name "clip"): the "tiny" CLIP (byte tokenizer, 2 x 64 text
         transformer, ViViT video tower) trained contrastively on (video, "digit N") pairs; its
         text tower is then frozen and its token states `(B, 32, 64)` condition the DiT. 1,500
         steps (165 CPU s): at 300 steps (zero-shot 69 %) the tower gave "digit 2" / "digit 6"
         almost the same states and the DiT drew 2s for "digit 6" (11 % digit accuracy on 6s);
         at 1,500 steps zero-shot is 97 % and the demo's digit accuracy rose from 70 to 84 %.
  dit    a `genjax train` config (model.name "video_dit"): the video DiT (joint spacetime
         attention, tubelets (1, 2, 2), width 128, depth 4) on the frozen VAE's latents (cached
         once, data.latents "cache"; scaled by 1 / their std, LDM App. D.1, which `genjax demo`
         measures into task.latent_scale) and the frozen text tower (task.text_encoder = the text
         stage), with text cross-attention, text dropout 0.1
         for classifier-free guidance, and frame-conditioning masks (Open-Sora v1.1) so the same
         model does image-to-video; eps-prediction, cosine schedule; 2,500 steps of batch 32
         (1,500 steps: digit accuracy 83.6 %; 2,500: 90.6 %; 32 wall-minutes on 2 idle EPYC cores).
  sample prompts and sampler settings for the demo's final samples.

Canvas: 32 x 32 with one digit (not the 64 x 64 two-digit canvas of Srivastava et al. 2015) so the
three stages fit the 30-minute budget on a 2-core CPU; two-digit prompts are sampled for show
but are outside the training captions.
Hardware: one 2-core CPU host. Run time (measured): `make demo` 43 min 24 s wall on a 2-core AMD
EPYC (VAE 388 s, text 173 s, DiT 1,898 s; 4,379 CPU s), 23 min 55 s on an earlier 2-core Xeon.
Expected result (measured, deterministic): the digit classifier recognises the prompted digit in
90.6 % of frames (target >= 80 %), temporal consistency 91.3 %, VAE PSNR 26.36 dB.
Smoke (`smoke=True`): 16 x 16-channel models, a handful of steps per stage; seconds on CPU.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg
from genjax.models import clip

PROMPTS = tuple(f"digit {d}" for d in range(10)) + ("digits 3 and 7", "digits 1 and 8")


def _data(batch_size: int, num_examples: int) -> ml_collections.ConfigDict:
    return common.moving_mnist(batch_size, num_examples, image_size=32, num_frames=8,
                               num_digits=1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, steps_scale=1.0)

    def steps(n):
        return common.scaled_steps(n, a.steps_scale)

    vae = ml_collections.ConfigDict()
    vae.seed = 0
    vae.num_steps = steps(800)
    vae.log_every_steps = 25
    vae.data = _data(32, 50_000)
    vae.data.num_frames = 1  # kt = 1: the VAE is frame-wise, so it trains on single frames
    vae.model = ml_collections.ConfigDict(dict(
        name="video_vae", in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, mid_block_attention=False,
        temporal_downsample=(False, False), temporal_kernel_size=1, scaling_factor=1.0, dtype="float32"))
    vae.task = ml_collections.ConfigDict(dict(kl_weight=1e-6, rec="l1"))
    vae.optim = common.optim(lr=1e-3, schedule="cosine", warmup_steps=50, end_lr_ratio=0.1,
                             ema_decay=0.99, ema_warmup=True)
    vae.mesh = common.mesh()
    vae.ckpt = common.ckpt(save_interval_steps=200, max_to_keep=1)
    vae.eval = common.evaluation(sample_every_steps=0, num_samples=8)

    text = ml_collections.ConfigDict()
    text.seed = 0
    text.num_steps = steps(1500)
    text.log_every_steps = 25
    text.data = _data(32, 20_000)
    text.model = ml_collections.ConfigDict(dict(name="clip", **clip.VARIANTS["tiny"], dtype="float32"))
    text.optim = common.optim(lr=3e-3, schedule="cosine", warmup_steps=100, weight_decay=1e-4,
                              ema_decay=0.0)
    text.mesh = common.mesh()
    text.ckpt = common.ckpt(save_interval_steps=500, max_to_keep=1)
    text.eval = common.evaluation(sample_every_steps=text.num_steps, num_samples=64)  # zero-shot acc.

    dit = ml_collections.ConfigDict()
    dit.seed = 0
    dit.num_steps = steps(2500)
    dit.log_every_steps = 25
    dit.data = _data(32, 6_000)
    dit.data.latents = "cache"  # encoded once by the frozen VAE into dit/latents/
    dit.model = ml_collections.ConfigDict(dict(
        name="video_dit", patch_size=(1, 2, 2), hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0,
        attention="joint", pos_embed="sincos", text_dropout_prob=0.1, dtype="float32"))
    # vae / text_encoder: the vae and text stages' folders, set by `genjax demo`; latent_scale 0:
    # 1 / std of the VAE's latents, measured by the demo before the stage trains.
    dit.task = ml_collections.ConfigDict(dict(vae="", text_encoder="", latent_scale=0.0,
                                              text_length=text.model.context_length))
    dit.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_timesteps=1000, prediction_type="epsilon", weighting="none",
        frame_mask_probs={"none": 0.8, "first": 0.2}))
    dit.optim = common.optim(lr=1e-3, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1,
                             ema_decay=0.999, ema_warmup=True)
    dit.mesh = common.mesh()
    dit.ckpt = common.ckpt(save_interval_steps=250, max_to_keep=1)
    dit.eval = common.evaluation(sample_every_steps=0, num_samples=8)

    sample = ml_collections.ConfigDict(dict(
        prompts=PROMPTS, samples_per_prompt=8, sampler="ddim", num_steps=50, cfg_scale=4.0,
        seed=0, num_reference=500))  # num_reference: test videos for FD and PSNR

    if a.smoke:
        for stage in (vae, text, dit):
            stage.num_steps = 3
            stage.log_every_steps = 1
            stage.data.update(batch_size=8, num_examples=64)
            stage.ckpt.update(save_interval_steps=3, async_save=False)
            stage.optim.warmup_steps = 1
        vae.model.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
        dit.model.update(hidden_size=32, depth=1, num_heads=2)
        text.eval.num_samples = 8
        text.eval.sample_every_steps = 0  # no zero-shot evaluation (one compile less)
        sample.update(prompts=("digit 3", "digits 3 and 7"), samples_per_prompt=1, num_steps=3,
                      num_reference=0)  # too few videos for a Frechet distance

    c = ml_collections.ConfigDict(dict(vae=vae, text=text, dit=dit, sample=sample))
    c.lock()
    return c
