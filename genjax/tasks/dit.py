"""Task "dit": the class-conditional DiT (Peebles & Xie 2023, `genjax.models.dit.DiT`; the model
section holds its attributes), with label dropout (model.class_dropout_prob) and null class
model.num_classes.

Pixel space (task.vae empty): x0 = images (B, S, S, data.channels), S = data.image_size.
Latent space (task.vae = a VAE workdir or a `genjax convert --model vae` folder, frozen; LDM,
Rombach et al. 2022): x0 = VAE latents `(z - shift_factor) * scaling_factor`, z ~ q(z | x) drawn
with the step's rng:
  data.latents = "on_the_fly": the batch's images are encoded inside the jitted train step;
  data.latents = "cache": the posterior mean and std are computed once into
    WORKDIR/latents/{split}.array_record (`latent_cache.ensure`) and the batch carries them.
Both give the same latents for the same examples and rng (tests/train/test_tasks.py).
Samples are decoded by the VAE. See `tasks.diffusion.image_task` for loss_fn and sample_fn.
"""

from __future__ import annotations


import jax.numpy as jnp

from genjax.errors import check
from genjax.tasks import Task, diffusion, is_model_dir, load_frozen, make_model

LATENT_MODES = ("on_the_fly", "cache")
# The config fields this family reads beyond the common ones (tasks.check_keys).
TASK_KEYS = ("vae",)
DATA_KEYS = ("latents",)
DIFFUSION_KEYS = diffusion.DIFFUSION_KEYS
EVAL_KEYS = diffusion.EVAL_KEYS


def validate(config) -> None:
    """Raises UserError: a task.vae that is not a trained VAE workdir or a converted VAE folder, or
    an unknown data.latents."""
    vae = config.get("task", {}).get("vae", "")
    if vae:
        check(is_model_dir(vae), "task.vae", vae, "must be a trained VAE workdir (genjax "
              "train) or a `genjax convert --model vae` folder holding config.json")
        latents = config.data.get("latents", "on_the_fly")
        check(latents in LATENT_MODES, "data.latents", latents, f"must be one of {LATENT_MODES}")


def build(config, *, mesh=None) -> Task:
    from genjax.data import recipes
    from genjax.models import dit
    from genjax.tasks import diffusion

    size = config.data.image_size
    vae_path = config.get("task", {}).get("vae", "")
    if vae_path:
        vae_module, vae_params = load_frozen(vae_path, mesh=mesh, family_name="vae")
        f = vae_module.downsample_factor
        check(size % f == 0, "data.image_size", size, f"must be divisible by the VAE's downsampling factor {f}")
        x_shape = (size // f, size // f, vae_module.latent_channels)
    else:
        x_shape = (size, size, config.data.channels)
    module = make_model(dit, dit.DiT, config.model, in_channels=x_shape[-1])
    check(x_shape[0] % module.patch_size == 0, "model.patch_size", module.patch_size,
          f"must divide the model's input side {x_shape[0]}")

    def init_params(key):
        x = jnp.zeros((1, *x_shape), jnp.float32)
        return module.init(key, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]

    def denoise(params, x_t, t, y, rng):
        if rng is None:
            return module.apply({"params": params}, x_t, t, y).astype(jnp.float32)
        return module.apply({"params": params}, x_t, t, y, train=True,
                            rngs={"dropout": rng}).astype(jnp.float32)

    kw = dict(x_shape=x_shape, num_classes=int(module.num_classes))
    if not vae_path:
        return diffusion.image_task(config, module, init_params, denoise, make_data=recipes.pixel_data(config), **kw)

    encode, decode, make_data = diffusion.latent_fns(config, vae_module, vae_params, vae_path, "image")
    return diffusion.image_task(config, module, init_params, denoise, make_data=make_data, encode=encode,
                                decode=decode, **kw)
