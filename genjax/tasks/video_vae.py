"""Task "video_vae": the causal video KL autoencoder (`genjax.models.video_vae.
VideoAutoencoderKL`; task.kl_weight, task.rec) on video clips (B, T, S, S, C) (`recipes.is_video`),
T = data.num_frames = 1 + k * the temporal factor. See `tasks.autoencoder`."""

from __future__ import annotations

from genjax.errors import check
from genjax.tasks import Task, make_model
from genjax.tasks.autoencoder import TASK_KEYS  # noqa: F401 (config.task's fields, tasks.check_keys)


def make_module(config):
    """The `VideoAutoencoderKL` of `config` (a frozen one is rebuilt from its run's config.json)."""
    from genjax.models import video_vae

    c = config.data.channels
    return make_model(video_vae, video_vae.VideoAutoencoderKL, config.model, in_channels=c, out_channels=c)


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes
    from genjax.tasks import autoencoder

    d = config.data
    check(recipes.is_video(config), "data.dataset", d.dataset,
          "video_vae trains on videos: moving_mnist, video_folder:PATH or a TFDS video dataset")
    module = make_module(config)
    fs, ft = module.downsample_factor, module.temporal_downsample_factor
    check(d.image_size % fs == 0, "data.image_size", d.image_size, f"must be divisible by {fs}")
    check((d.num_frames - 1) % ft == 0, "data.num_frames", d.num_frames, f"must be 1 + k * {ft}")
    return autoencoder.task(config, module, (d.num_frames, d.image_size, d.image_size, d.channels), "video")
