"""Task "unet": the pixel-space DDPM / ADM U-Net (Ho et al. 2020, `genjax.models.unet.UNet`; the
model section holds its attributes).

task.num_classes > 0: a learned class table with num_classes + 1 rows (the last is the null
class); labels are replaced by the null class with probability task.class_dropout_prob in
training (Ho & Salimans 2022), and samples use classifier-free guidance. 0: unconditional.
See `tasks.diffusion.image_task` for loss_fn and sample_fn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genjax.tasks import Task, diffusion, make_model

# The config fields this family reads beyond the common ones (tasks.check_keys).
TASK_KEYS = ("num_classes", "class_dropout_prob")
DIFFUSION_KEYS = diffusion.DIFFUSION_KEYS
EVAL_KEYS = diffusion.EVAL_KEYS


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes
    from genjax.models import unet
    from genjax.tasks import diffusion

    size, channels = config.data.image_size, config.data.channels
    task = config.get("task", {})
    num_classes = int(task.get("num_classes", 0))
    conditional = num_classes > 0
    module = make_model(unet, unet.UNet, config.model, sample_size=size, in_channels=channels,
                        out_channels=channels, num_class_embeds=num_classes + 1 if conditional else None)
    p_drop = float(task.get("class_dropout_prob", 0.0))

    def init_params(key):
        x = jnp.zeros((1, size, size, channels), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if conditional else None
        return module.init(key, x, jnp.zeros((1,), jnp.int32), y)["params"]

    def denoise(params, x_t, t, y, rng):
        if rng is None:
            return module.apply({"params": params}, x_t, t, y).astype(jnp.float32)
        drop_rng, dropout_rng = jax.random.split(rng)
        if conditional and p_drop > 0:
            y = jnp.where(jax.random.uniform(drop_rng, y.shape) < p_drop, num_classes, y)
        return module.apply({"params": params}, x_t, t, y, train=True,
                            rngs={"dropout": dropout_rng}).astype(jnp.float32)

    return diffusion.image_task(config, module, init_params, denoise, x_shape=(size, size, channels),
                                make_data=recipes.pixel_data(config), conditional=conditional,
                                num_classes=num_classes, size_multiple=2 ** (len(module.block_out_channels) - 1))
