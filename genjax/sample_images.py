"""Class-conditional (or unconditional) image generation for `genjax sample`.

    genjax sample --workdir runs/dit_mnist --class-label 3 --num 8 --out threes.npz
    genjax convert --from diffusers --model dit DiT-XL-2-256/transformer --out runs/dit_xl2
    genjax convert --from diffusers --model vae DiT-XL-2-256/vae --out runs/sd_vae
    genjax sample --workdir runs/dit_xl2 --vae runs/sd_vae --class-label 207 --class-label 360 \\
        --num 2 --steps 50 --cfg-scale 4 --out dit_xl2.npz

The workdir is either a `genjax train` run of an image diffusion model (model.name "dit" — on
pixels or on a frozen VAE's latents — or "unet"; its EMA params), or a `genjax convert` folder
of a diffusers `DiTTransformer2DModel` (with `--vae`, required since released DiTs are latent
models: a converted `AutoencoderKL` or a trained VAE workdir) or `UNet2DModel` (unconditional).
Converted models are sampled with the noise schedule of their papers — DiT (Peebles & Xie 2023) and DDPM (Ho et al. 2020) both train on
linear betas 1e-4 .. 0.02 over T = 1000 with epsilon prediction — and the null class id of DiT's
label embedder (`num_classes`) for classifier-free guidance, as diffusers' `DiTPipeline` does;
tests/test_sample_images.py checks a converted DiT + VAE against `DiTPipeline` with DDIM.

Generation goes through the trainer's own sampler (`train.tasks`, `_diffusion_task.sample_fn`):
noise -> `samplers.sample` (one compiled loop) with `guidance.cfg_denoiser` -> VAE decoder -> uint8.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from genjax.errors import check, fail

IMAGE_MODELS = ("dit", "unet")
# Converted checkpoints carry no training config: the schedule both papers trained with.
PAPER_DIFFUSION = dict(schedule="linear", num_timesteps=1000, prediction_type="epsilon", weighting="none")


class ImageModel(NamedTuple):
    """A restored image diffusion model: `config` (a trainer config: model, data, diffusion, eval),
    `task` (`train.tasks.Task`, whose `sample_fn` generates), `params` (EMA or converted, unboxed),
    `num_classes` (0: unconditional) and `image_size` (the side of the square images it makes)."""

    config: Any
    task: Any
    params: Any
    num_classes: int
    image_size: int


def is_image_model(workdir: str) -> bool:
    """True if `workdir` holds a trained image diffusion model or a converted DiT / U-Net / VAE."""
    from genjax import convert

    converted = convert.read_converted_config(workdir)
    if converted is not None:
        return True
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model", {}).get("name") in IMAGE_MODELS


def _eval_section(sampler: str, num_steps: int, cfg_scale: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(sample_every_steps=0, num_samples=1, sampler=sampler,
                                          num_sampling_steps=num_steps, cfg_scale=cfg_scale))


def _converted_config(converted: dict, workdir: str, vae: str | None, image_size: int | None):
    """A trainer config (`tasks.build_dit` / `build_unet`) for a converted DiT / U-Net."""
    from genjax import convert

    family, kwargs = converted["family"], dict(converted["kwargs"])
    check(family in IMAGE_MODELS, "--workdir", workdir,
          f"is a converted {family!r} model, which cannot sample alone (pass it as --vae of a latent DiT)")
    size = converted.get("sample_size")
    if family == "unet":
        check(not kwargs.get("num_class_embeds"), "--workdir", workdir,
              "is a class-conditional converted U-Net: its null class is not known, only "
              "unconditional converted U-Nets can be sampled")
        model = dict(kwargs, name="unet", num_classes=0)
        multiple = 2 ** (len(kwargs["block_out_channels"]) - 1)  # the U-Net's downsampling
    else:  # diffusers' DiT checkpoints are latent models: they need their VAE
        check(vae is not None, "--vae", vae, "is required: a converted DiT works on VAE latents (give the "
              "VAE folder, e.g. `genjax convert --model vae .../vae --out DIR`)")
        vae_converted = convert.read_converted_config(vae)
        check(vae_converted["family"] == "vae" if vae_converted else os.path.isfile(os.path.join(vae, "config.json")),
              "--vae", vae, "must be a `genjax convert --model vae` folder or a trained VAE workdir")
        from genjax.train import tasks

        vae_module, _ = tasks.load_frozen(vae, mesh=None)
        check(vae_module.latent_channels == kwargs["in_channels"], "--vae", vae,
              f"has {vae_module.latent_channels} latent channels; the DiT takes {kwargs['in_channels']}")
        f = vae_module.downsample_factor
        size = None if size is None else size * f
        model = dict(kwargs, name="dit", vae=vae)
        multiple = f * kwargs["patch_size"]
    size = image_size or size
    check(size is not None, "--height", image_size,
          "is required: the converted model's config.json gives no sample_size")
    check(size % multiple == 0, "--height", size, f"must be a multiple of {multiple} (the model's downsampling)")
    data = dict(image_size=int(size), channels=int(kwargs["in_channels"]))
    return ml_collections.ConfigDict(dict(model=model, data=data, diffusion=PAPER_DIFFUSION, seed=0))


def load(workdir: str, *, vae: str | None = None, sampler: str = "ddim", num_steps: int = 50,
         cfg_scale: float = 4.0, image_size: int | None = None) -> ImageModel:
    """Restore the image model of `workdir` with the sampler settings baked into its `sample_fn`.

    Args:
      workdir: a `genjax train` run (model.name "dit" or "unet") or a `genjax convert` folder.
      vae: for a converted DiT (required), its VAE folder (converted or trained); ignored
        otherwise (a trained latent DiT names its VAE in its config).
      sampler: a `samplers.sample` name ("ddpm", "ddim", "dpmpp_2m", ...); num_steps; cfg_scale
        (1: no guidance; unused by unconditional models).
      image_size: the image side; default the training size or the converted config's
        sample_size (x the VAE's downsampling for latent DiTs).

    Raises:
      UserError: no model there, a converted VAE as workdir, a latent DiT without `--vae`, a VAE
        whose latent channels do not match, or an image size the model cannot take.
    """
    from genjax import convert
    from genjax.train import tasks

    converted = convert.read_converted_config(workdir)
    eval_section = _eval_section(sampler, num_steps, cfg_scale)
    if converted is None:
        config, task, params = tasks.restore(workdir, devices=jax.devices()[:1], eval_overrides=eval_section)
        check(image_size in (None, config.data.image_size), "--height", image_size,
              f"must be {config.data.image_size} (the size this model was trained at)")
    else:
        config = _converted_config(converted, workdir, vae, image_size)
        config.eval = eval_section
        task = tasks.build(config)
        params = convert.load_converted(workdir)[1]
    num_classes = int(config.model.get("num_classes", 0))
    return ImageModel(config, task, nn.meta.unbox(params), num_classes, int(config.data.image_size))


def generate(model: ImageModel, class_labels, *, seed: int = 0) -> np.ndarray:
    """Images for `class_labels` (one per entry): uint8 `(N, S, S, C)` in [0, 255].

    Args:
      model: `load(...)`. class_labels: N ints in [0, num_classes) (for an unconditional model
        only their count matters). seed: the key `PRNGKey(seed)` of the noise and the sampler;
        the same seed gives the same images.

    Raises:
      UserError: no labels, or a label outside [0, num_classes).
    """
    labels = np.asarray(class_labels)
    check(labels.ndim == 1 and labels.size >= 1, "--class-label", list(labels.ravel()), "must give at least one label")
    if model.num_classes:
        check(np.issubdtype(labels.dtype, np.integer) and bool(np.all((labels >= 0) & (labels < model.num_classes))),
              "--class-label", labels.tolist(), f"must be ints in [0, {model.num_classes})")
    return np.asarray(model.task.sample_fn(model.params, jax.random.PRNGKey(seed),
                                           labels=jnp.asarray(labels, jnp.int32)))


def write_outputs(out: str, images: np.ndarray, class_labels) -> list[str]:
    """`out` (.npz with `images` uint8 (N, H, W, C) and `class_labels` int32 (N,)) and a PNG grid
    beside it (same stem), captioned with the labels. Returns the two paths."""
    from genjax.io import media

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    labels = np.asarray(class_labels, np.int32)
    tmp = out[:-len(".npz")] + ".tmp.npz"  # no half-written file under the final name
    np.savez(tmp, images=images, class_labels=labels)
    os.replace(tmp, out)
    png = media.write_png_grid(os.path.splitext(out)[0] + ".png", images,
                               captions=[f"class {int(y)}" for y in labels])
    return [out, png]


def main(args, sampler: str) -> int:
    """`genjax sample` for image models: `--class-label` (repeatable; default every class once,
    or `--num` unconditional images) x `--num` images -> `--out` (+ .png). Arguments are checked
    by `genjax.sample.main` before this runs."""
    check(not args.prompt, "--prompt", args.prompt, "is for text-to-video models; this is a "
          "class-conditional image model: use --class-label N")
    check(args.frames in (None, 1) and args.init_frame is None, "--frames/--init-frame",
          args.frames if args.init_frame is None else args.init_frame, "are for video models")
    check(args.height == args.width, "--height/--width", f"{args.height}/{args.width}",
          "must be equal (image models sample square images)")
    model = load(args.workdir, vae=args.vae, sampler=sampler, num_steps=args.steps or 50,
                 cfg_scale=4.0 if args.cfg_scale is None else args.cfg_scale, image_size=args.height)
    if model.num_classes:
        given = args.class_label or list(range(min(model.num_classes, 10)))
        check(all(0 <= y < model.num_classes for y in given), "--class-label", given,
              f"must be ints in [0, {model.num_classes})")
        labels = [y for y in given for _ in range(args.num)]
    else:
        check(not args.class_label, "--class-label", args.class_label, "this model is unconditional")
        labels = [0] * args.num
    images = generate(model, labels, seed=args.seed)
    for path in write_outputs(args.out, images, labels):
        print(path)
    return 0
