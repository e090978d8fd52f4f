"""Text-to-video latent diffusion on one-digit Moving MNIST: a Sora-style video DiT
(`genjax.models.video_dit`) on the latents of the frozen video VAE of
`configs/video_vae_moving_mnist.py`, conditioned on the captions ("digit N") through a small
CLIP-style text transformer trained jointly (byte tokenizer). Train the video VAE first:

    genjax train --config configs/video_vae_moving_mnist.py --workdir runs/video_vae_mm
    genjax train --config configs/video_dit_moving_mnist.py:vae=runs/video_vae_mm --workdir runs/video_dit_mm
    genjax sample --workdir runs/video_dit_mm --prompt "digit 3" --out threes.npz
        (or `tasks.restore(workdir)` + `task.sample_fn(params, rng, ["digit 3"])`)

Smoke (seconds on a CPU; tests/train/test_tasks.py):

    genjax train --config configs/video_vae_moving_mnist.py:smoke=True --workdir /tmp/vvae_smoke
    genjax train --config configs/video_dit_moving_mnist.py:smoke=True,vae=/tmp/vvae_smoke --workdir /tmp/vdit_smoke

`vae` (-> task.vae) is a trained `video_vae` workdir, frozen (its EMA params); each clip is
encoded inside the train step and z ~ q(z | x) is scaled by task.latent_scale (0 = the VAE's
scaling_factor, 1.0 for the "tiny" video VAE; set it to about 1 / latent_std from the VAE's
metrics.jsonl, LDM appendix D.1). `steps` overrides num_steps.

task.text_encoder (`genjax.tasks.text_encoders`; the kind is read from the folder): "" (default) a
byte tokenizer and the joint text tower below; a genjax CLIP workdir: its frozen text tower; a
transformers T5 / mT5 / umT5 encoder folder (config.json model_type t5 / mt5 / umt5, safetensors,
tokenizer.json) or a transformers CLIP folder (model_type clip / clip_text_model, tokenizer.json):
that frozen encoder and its tokenizer, e.g. `--config.task.text_encoder=/models/umt5-xxl
--config.task.text_length=512 --config.task.text_dtype=bfloat16` (task.text_dtype, optional:
"float32" default or "bfloat16", the frozen encoder's dtype; T5 params are sharded over the
mesh's fsdp / tensor axes). task.text_length is the token length of every kind.

`packed=True` trains on clips of mixed sizes and durations at once, NaViT-packed (Dehghani et
al. 2023; the Sora report's native-size training): data.sizes draws each clip's (frames, height,
width) from 32x32, 32x48 and 48x32 canvases of 1 (an image), 5, 9 and 13 frames; each clip is
encoded alone by the VAE in the input pipeline and its latent tubelets are packed into
data.batch_size sequences of data.packing.seq_len tokens (one compiled step for every size;
`genjax.data.recipes.packed_latent_data`). Samples can be drawn at any of those sizes
(`genjax sample --frames --height --width`).

Data: procedural one-digit Moving MNIST, 9 frames of 32 x 32 (as the video VAE config), captions
"digit N". Latents 3 x 8 x 8 x 4 (the tiny video VAE: f = 4 in space and time). Model: VideoDiT
depth 4, width 128, 4 heads, joint space-time attention over (1, 2, 2) tubelets (3 x 4 x 4 = 48
tokens), adaLN-Zero on the timestep + pooled text, cross-attention to 16 text tokens; text tower
2 layers x 64 wide, 4 heads; text dropout 0.1 for classifier-free guidance. Linear betas, T =
1000, v-prediction; diffusion.frame_mask_probs with kinds other than "none" also trains image-to-video / extension
(`sample_fn(..., init_frames=...)`). AdamW lr 3e-4, batch 16, EMA 0.999, 6k steps; 1.59 M DiT +
0.12 M text parameters. Samples (every 1000 steps, samples/step_XXXXXX.gif): DDIM-50 with
cfg_scale 4 for "digit 0" ... "digit 7". `objective=flow` trains rectified flow (velocity target,
logit-normal timesteps) and samples with Euler; `objective=eps` epsilon prediction.

Hardware: a 2-core CPU. Run time (measured: 1.0 CPU-second per train step at batch 32, float32,
almost all of it the on-the-fly video VAE encoder; 2.2 s wall per step at batch 32 on 2 cores
shared with other jobs, load ~9): ~0.5 CPU-s per step at batch 16, so the 6k steps take ~50
CPU-minutes, about half an hour to an hour on a free 2-core CPU (extrapolated, not run end to end);
a GPU takes minutes. Expected result (estimate, not measured): once the video VAE reconstructs
readable digits, samples show the prompted digit moving.
Smoke (`smoke=True`, needs `vae=` a smoke video VAE): 5 frames of 32 x 32 -> 3 x 16 x 16 x 4
latents, DiT depth 1 width 32, text tower 1 x 32, batch 4, 4 steps, DDIM-3 samples; seconds on a CPU.
"""

from __future__ import annotations

import ml_collections

from configs import common
from genjax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, vae="", steps=0, objective="v", packed=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 6_000
    c.log_every_steps = 50
    c.data = ml_collections.ConfigDict(dict(dataset="moving_mnist", split="train", batch_size=16,
                                            image_size=32, num_frames=9, num_digits=1,
                                            num_examples=100_000, channels=1,
                                            latents="on_the_fly"))
    c.model = ml_collections.ConfigDict(dict(
        name="video_dit", patch_size=(1, 2, 2), hidden_size=128, depth=4, num_heads=4, attention="joint",
        pos_embed="sincos", text_dropout_prob=0.1, learn_sigma=False, dtype="float32",
        scan=False, remat="none"))
    c.task = ml_collections.ConfigDict(dict(
        vae=a.vae, latent_scale=0.0, text_encoder="", text_length=16,
        text=dict(width=64, num_layers=2, num_heads=4, mlp_dim=256)))
    c.diffusion = common.diffusion(a.objective)  # objective=flow: rectified flow
    c.diffusion.frame_mask_probs = {"none": 1.0}
    c.optim = common.optim(lr=3e-4, ema_decay=0.999, ema_warmup=True)
    c.mesh = common.mesh()
    c.ckpt = common.ckpt(save_interval_steps=1000, max_to_keep=2)
    c.eval = common.evaluation(sample_every_steps=1000, num_samples=8, cfg_scale=4.0,
                               sampler="euler" if a.objective == "flow" else "ddim")
    if a.smoke:
        c.num_steps = 4
        c.log_every_steps = 1
        c.data.update(batch_size=4, num_frames=5, num_examples=64)
        c.model.update(hidden_size=32, depth=1, num_heads=2)
        c.task.text = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64)
        c.optim.update(lr=1e-3, ema_decay=0.9)
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=4, num_samples=2, num_sampling_steps=3)
    if a.packed:  # f = 4 VAE, (1, 2, 2) tubelets: 13 x 48 x 32 -> 4 x 6 x 4 = 96 tokens, an image 16
        sizes = [(t, h, w) for t in (1, 5, 9, 13) for h, w in ((32, 32), (32, 48), (48, 32))]
        c.data.update(batch_size=4, sizes=sizes, packing=dict(seq_len=256, max_per_seq=12))
        if a.smoke:  # f = 2 VAE: 9 x 48 x 32 -> 5 x 12 x 8 = 480 tokens
            sizes = [(1, 32, 32), (5, 32, 32), (5, 32, 48), (9, 48, 32)]
            c.data.update(batch_size=2, sizes=sizes, packing=dict(seq_len=512, max_per_seq=4, lookahead=16))
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
