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

data.packing = {seq_len, max_per_seq, ...}: NaViT patch n' pack (Dehghani et al. 2023). Each image
keeps its aspect ratio, resized down (never up) to fit seq_len patches (`transforms.FitArea`; an
image folder or TFDS dataset of native sizes), is encoded alone by the frozen VAE in the input
pipeline (pixel space: its pixels; data.latents "cache": once, into a ragged latent cache), and its patches are packed with others into data.batch_size
sequences of seq_len tokens (`recipes.packed_latent_data`): one compiled step for every size.
The loss is `tasks.diffusion.packed_loss` through `DiT.packed` (one time per image, each with its
own flow shift). Samples are drawn at data.image_size.
"""

from __future__ import annotations

import os

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
    """Raises UserError: a task.vae that is not a trained VAE workdir or a converted VAE folder, an
    unknown data.latents; with data.packing (at build): model.learn_sigma."""
    vae = config.get("task", {}).get("vae", "")
    if vae:
        check(is_model_dir(vae), "task.vae", vae, "must be a trained VAE workdir (genjax "
              "train) or a `genjax convert --model vae` folder holding config.json")
        latents = config.data.get("latents", "on_the_fly")
        check(latents in LATENT_MODES, "data.latents", latents, f"must be one of {LATENT_MODES}")


def build(config, *, mesh=None) -> Task:
    from genjax.models import dit

    x_shape, vae = inputs(config, mesh)
    module = make_model(dit, dit.DiT, config.model, in_channels=x_shape[-1])
    task = image_task(config, module, x_shape, vae)
    if config.data.get("packing") is None:
        return task
    loss_fn, make_data = _packed(config, module, *vae[:2])
    return task._replace(loss_fn=loss_fn, make_data=make_data, encode=None)


def inputs(config, mesh):
    """`(x_shape, (vae_module, vae_params, vae_path))` of the diffusion model's inputs: pixels
    (task.vae empty: modules None) or the frozen VAE's latents."""
    size = config.data.image_size
    vae_path = config.get("task", {}).get("vae", "")
    if not vae_path:
        return (size, size, config.data.channels), (None, None, "")
    vae_module, vae_params = load_frozen(vae_path, mesh=mesh, family_name="vae")
    f = vae_module.downsample_factor
    check(size % f == 0, "data.image_size", size, f"must be divisible by the VAE's downsampling factor {f}")
    return (size // f, size // f, vae_module.latent_channels), (vae_module, vae_params, vae_path)


def image_task(config, module, x_shape, vae, *, denoise_kwargs=None) -> Task:
    """The class-conditional image diffusion `Task` of a DiT-like `module` (called as
    `module(x (B, *x_shape), t (B,), y (B,), train=..., **denoise_kwargs)`) on the inputs of
    `inputs`: `tasks.diffusion.image_task` with the frozen VAE's encode / decode and data.
    `denoise_kwargs(rng) -> (kwargs, rngs)` adds training-only call arguments and rng streams
    (MDT's masked branch, `tasks.mdt`).

    Raises:
      UserError: model.patch_size not dividing the input side.
    """
    from genjax.data import recipes

    vae_module, vae_params, vae_path = vae
    check(x_shape[0] % module.patch_size == 0, "model.patch_size", module.patch_size,
          f"must divide the model's input side {x_shape[0]}")

    def init_params(key):
        x = jnp.zeros((1, *x_shape), jnp.float32)
        return module.init(key, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]

    def denoise(params, x_t, t, y, rng):
        if rng is None:
            return module.apply({"params": params}, x_t, t, y).astype(jnp.float32)
        kwargs, rngs = denoise_kwargs(rng) if denoise_kwargs else ({}, {})
        return module.apply({"params": params}, x_t, t, y, train=True, rngs={"dropout": rng, **rngs},
                            **kwargs).astype(jnp.float32)

    f = vae_module.downsample_factor if vae_module is not None else 1  # any multiple of f x patch samples
    fixed_size = hasattr(module, "input_size")  # MDT's learnable positions: one input size
    kw = dict(x_shape=x_shape, num_classes=int(module.num_classes), latent_factor=f,
              size_multiple=0 if fixed_size else f * module.patch_size)
    encode = decode = None
    make_data = recipes.pixel_data(config)
    if vae_path:
        encode, decode, make_data = diffusion.latent_fns(config, vae_module, vae_params, vae_path, "image")
    return diffusion.image_task(config, module, init_params, denoise, make_data=make_data, encode=encode,
                                decode=decode, **kw)


def _packed(config, module, vae_module, vae_params):
    """`(loss_fn, make_data)` of packed training (data.packing; module docstring); vae_module None
    in pixel space."""
    from genjax.data import recipes, transforms

    d, p = config.data, module.patch_size
    check(not module.learn_sigma, "model.learn_sigma", True, "must be false with data.packing (no packed VLB)")
    f = vae_module.downsample_factor if vae_module is not None else 1
    fit = transforms.FitArea(max_area=d.packing.seq_len * (f * p) ** 2, multiple=f * p, keys=("image",))
    posterior = None if vae_module is None else diffusion.posterior_fn(vae_module, vae_params)
    meta = None if vae_module is None else {"vae": os.path.abspath(config.task.vae)}
    make_data = recipes.packed_latent_data(config, posterior, patch_size=(1, p, p), inputs=recipes.image_inputs,
                                           fit=fit, meta=meta)
    conditional = bool(module.num_classes)

    def conditions(params, batch):
        return {"y": jnp.maximum(batch["label"], 0)} if conditional else None

    def denoise(params, batch, x_t, t, rng, **cond):
        return module.apply({"params": params}, x_t, batch["segment_ids"], batch["positions"], t, cond.get("y"),
                            example_shape=batch["example_shape"], train=True, rngs={"dropout": rng},
                            method=module.packed).astype(jnp.float32)

    latent = None if vae_module is None else (vae_module.latent_channels, vae_module.scaling_factor,
                                              vae_module.shift_factor)
    return diffusion.packed_loss(config, diffusion.make_schedule(config), denoise, conditions, latent=latent), make_data
