"""Task "vae": the 2D KL autoencoder (`genjax.models.vae.AutoencoderKL`; the model section holds
its attributes; task.kl_weight, task.rec) on images (B, S, S, data.channels). See
`tasks.autoencoder`."""

from __future__ import annotations

from genjax.errors import check
from genjax.tasks import Task, make_model
from genjax.tasks.autoencoder import TASK_KEYS  # noqa: F401 (config.task's fields, tasks.check_keys)


def make_module(config):
    """The `AutoencoderKL` of `config` (a frozen VAE is rebuilt from its run's config.json)."""
    from genjax.models import vae

    c = config.data.channels
    return make_model(vae, vae.AutoencoderKL, config.model, in_channels=c, out_channels=c)


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.tasks import autoencoder

    size, channels = config.data.image_size, config.data.channels
    module = make_module(config)
    f = module.downsample_factor
    check(size % f == 0, "data.image_size", size, f"must be divisible by the downsampling factor {f}")
    return autoencoder.task(config, module, (size, size, channels), "image")
