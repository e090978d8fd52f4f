"""What the trainer trains: one module per `config.model.name`, each with `build(config, mesh)`
returning a `Task`, and `make_module(config)` returning its Flax module.

    dit        class-conditional DiT on pixels or on a frozen VAE's latents      tasks/dit.py
    unet       pixel-space DDPM / ADM U-Net                                      tasks/unet.py
    vae        2D KL autoencoder                                                 tasks/vae.py
    video_vae  causal video KL autoencoder                                       tasks/video_vae.py
    clip       contrastive text <-> image / video                                tasks/clip.py
    video_dit  text-to-video latent diffusion on a frozen video VAE              tasks/video_dit.py
    vivit      ViViT video classifier                                            tasks/vivit.py
    wan        Wan 2.1 text-to-video from a converted diffusers pipeline (sampling) tasks/wan.py
    vqvae      VQ-VAE (loss-trained or EMA codebook, dead-code restarts)         tasks/vqvae.py
    mdt        Masked Diffusion Transformer: task "dit" + a masked branch        tasks/mdt.py
    mae        MAE / VideoMAE masked-autoencoder pre-training, linear probe      tasks/mae.py
    pixelcnn   class-conditional gated PixelCNN on binarised images              tasks/pixelcnn.py
    var        VAR next-scale prediction on a frozen multi-scale VQ-VAE's tokens tasks/var.py
    dvae       DALL·E discrete VAE (Gumbel-softmax, KL to a uniform prior)      tasks/dvae.py
    dalle      DALL·E text-to-image transformer on a frozen dVAE's tokens       tasks/dalle.py

`build` picks the module by name (`importlib.import_module(f"genjax.tasks.{name}")`, as
big_vision picks models). The model section goes to the module verbatim (`model_kwargs`):
`config.model` minus `name` are the attributes of the family's `genjax.models.<family>.Model`, so a
misspelt key is an error; task knobs (frozen model paths, KL weight, latent scale, ...) live in
`config.task`. A `Task` holds pure functions; the trainer (`genjax.train.trainer.main`) owns the
mesh, the state, the loop and the files; `genjax sample` restores params (`restore`) and calls
`sample_fn`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check

MODEL_NAMES = ("dit", "unet", "vae", "video_vae", "clip", "video_dit", "vivit", "wan", "vqvae", "mdt", "mae",
               "pixelcnn", "var", "dvae", "dalle")
# The Linen class in genjax.models.<name> that each family's build passes to make_model: its
# attributes are the model section's allowed keys (checked early by check_keys).
MODEL_CLASSES = {"dit": "DiT", "unet": "UNet", "vae": "AutoencoderKL", "video_vae": "VideoAutoencoderKL",
                 "clip": "CLIP", "video_dit": "VideoDiT", "vivit": "ViViTClassifier",
                 "wan": "WanTransformer", "vqvae": "VQVAE", "mdt": "MDT", "mae": "MAE",
                 "pixelcnn": "GatedPixelCNN", "var": "VAR", "dvae": "DiscreteVAE", "dalle": "DalleTransformer"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The metrics key under which a loss_fn returns its updated model state (`Task.init_state`).
MODEL_STATE = "model_state"


class Task(NamedTuple):
    """One trainable model, as pure functions of its params.

    Fields:
      module: the Flax module.
      init_params: `key -> params` (boxed, with logical axis names), for `state.create_train_state`.
      loss_fn: `(params, batch, rng) -> (loss float32 scalar, metrics dict of float32 scalars)`.
      sample_fn: `(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None,
        init_frames=None, ...) -> uint8 media`: images `(N, H, W, C)` (written as a PNG grid) or
        videos `(N, T, H, W, C)` (a GIF). `cond` is what the model is conditioned on (class labels,
        prompts, images to reconstruct; None: the config's defaults); the keyword settings default
        to config.eval. None for models without samples.
      make_data: `(workdir, shard_index=None, shard_count=None) -> grain iterator` of batches
        (dicts of numpy arrays with a leading batch axis); `workdir` holds any cache it builds.
      evaluate: `params -> {name: float}` metrics logged at sample time, or None.
      encode: a latent diffusion task's `(batch, rng) -> latents` (the diffusion model's x0), else None.
      frozen: a dict of frozen params (already placed on the mesh, e.g. a frozen text encoder's,
        `tasks.text_encoders`) that loss_fn sees merged into its params (`{**params, **frozen}`):
        the trainer passes them to the compiled step as an argument, so they keep their sharding
        (jit embeds a closed-over array in the program, replicated), and never trains or saves them.
      init_state: `key -> model state`, a dict of non-gradient Flax collections carried from step
        to step (`TrainState.model_state`, e.g. a VQ-VAE's EMA codebook), or None. loss_fn,
        sample_fn and evaluate see it merged into their params (`{**params, **model_state}`);
        loss_fn returns the updated state as `metrics[MODEL_STATE]`. Checkpointed with
        the train state; `restore` returns it merged into the EMA params.
    """

    module: nn.Module
    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
    sample_fn: Callable[..., jax.Array] | None
    make_data: Callable[..., Any]
    evaluate: Callable[[Any], dict[str, float]] | None = None
    encode: Callable[[Mapping[str, jax.Array], jax.Array], jax.Array] | None = None
    frozen: Mapping[str, Any] | None = None
    init_state: Callable[[jax.Array], Any] | None = None


def family(name: str):
    """The task module of model name `name`.

    Raises:
      UserError: no such task.
    """
    check(name in MODEL_NAMES, "model.name", name, f"must be one of {MODEL_NAMES}")
    return importlib.import_module(f"genjax.tasks.{name}")


def validate(config) -> None:
    """The model, task and data sections' checks, needing no devices or files beyond existence.

    Raises:
      UserError: unknown model.name or model.dtype, a model size < 1 or a dropout probability
        outside [0, 1] (see `model_kwargs`), a data error (`recipes.validate`), a diffusion
        family's objective error (`tasks.diffusion.validate`), and the
        family's own checks (its `validate`, e.g. a frozen-model path that is not a workdir).
    """
    from genjax.data import recipes

    task = family(config.model.name)
    for key, value in config.model.items():  # sizes >= 1 etc., before anything is built
        _check_range(key, _to_attribute(key, value))
    dtype = config.model.get("dtype", "float32")
    check(dtype in DTYPES, "model.dtype", dtype, f"must be one of {tuple(DTYPES)}")
    recipes.validate(config)
    if hasattr(task, "DIFFUSION_KEYS"):
        from genjax.tasks import diffusion

        diffusion.validate(config)
    if hasattr(task, "validate"):
        task.validate(config)


# config.eval's fields common to every family (the trainer reads sample_every_steps and
# num_samples; a diffusion family the sampler settings and its own EVAL_KEYS).
EVAL_KEYS = ("sample_every_steps", "num_samples", "sampler", "num_sampling_steps", "cfg_scale")
# Top-level fields of a training config; "task" and "diffusion" only for a family that has
# TASK_KEYS / DIFFUSION_KEYS.
TOP_KEYS = ("seed", "num_steps", "log_every_steps", "model", "data", "optim", "ckpt", "eval", "mesh")


def check_keys(config) -> None:
    """Refuse a config key that nothing reads, before anything is built: at the top level and in
    the data, task, diffusion and eval sections, each against its consumer's fields
    (`recipes.DATA_KEYS`, `EVAL_KEYS`, and the family module's TASK_KEYS, DIFFUSION_KEYS,
    DATA_KEYS and EVAL_KEYS), and the model section against the attributes of the family's
    Linen class (`MODEL_CLASSES`, as `model_kwargs` does at build); optim, ckpt and mesh are
    checked by the trainer (`genjax.train.trainer.validate`).

    Raises:
      UserError: one line naming the first unknown key and the allowed ones.
    """
    from genjax.config import check_keys as check_section
    from genjax.data import recipes

    task = family(config.get("model", {}).get("name"))  # a missing name: "model.name=None: ..."
    extra = tuple(name for name in ("task", "diffusion") if hasattr(task, f"{name.upper()}_KEYS"))
    check_section("", config, TOP_KEYS + extra)
    name = config.model.name
    model_kwargs(getattr(importlib.import_module(f"genjax.models.{name}"), MODEL_CLASSES[name]), config.model)
    check_section("data", config.data, recipes.DATA_KEYS + getattr(task, "DATA_KEYS", ()))
    check_section("eval", config.get("eval"), EVAL_KEYS + getattr(task, "EVAL_KEYS", ()))
    for name in extra:
        check_section(name, config.get(name), getattr(task, f"{name.upper()}_KEYS"))


def build(config, *, mesh: Mesh | None = None) -> Task:
    """The `Task` of `config.model.name`. `mesh` (default: all devices, one data axis) is where
    frozen models are placed, replicated.

    Raises:
      UserError: see `validate` and each family's `build`.
    """
    validate(config)
    return family(config.model.name).build(config, mesh=mesh)


def _to_attribute(key: str, value: Any) -> Any:
    if key in ("dtype", "param_dtype") and isinstance(value, str):
        return DTYPES[value]
    if isinstance(value, (list, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


# Model attributes that are sizes or counts (ints, or tuples of ints, each >= 1) in every family
# that has them, and those that are probabilities or non-negative.
POSITIVE_FIELDS = frozenset((
    "depth", "num_layers", "num_heads", "hidden_size", "mlp_dim", "embed_dim", "patch_size",
    "text_layers", "text_heads", "text_width", "vision_layers", "vision_heads", "vision_width",
    "video_layers", "video_patch_size", "layers_per_block", "latent_channels", "norm_num_groups",
    "block_out_channels", "attention_head_dim", "context_length", "vocab_size", "in_channels",
    "out_channels", "frequency_embedding_size", "num_codes", "code_dim"))
PROBABILITY_FIELDS = frozenset(("class_dropout_prob", "text_dropout_prob", "dropout"))
NON_NEGATIVE_FIELDS = frozenset(("num_classes", "num_temporal_layers", "video_temporal_layers"))


def _check_range(key: str, value: Any) -> None:
    """UserError unless a size field is >= 1 (each entry of a tuple), a probability in [0, 1], a
    count >= 0 and mlp_ratio > 0; other fields and non-numbers (None, strings) pass."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if key in POSITIVE_FIELDS:
        check(all(v >= 1 for v in numbers), f"model.{key}", value, "must be >= 1")
    elif key in PROBABILITY_FIELDS:
        check(all(0 <= v <= 1 for v in numbers), f"model.{key}", value, "must be in [0, 1]")
    elif key in NON_NEGATIVE_FIELDS:
        check(all(v >= 0 for v in numbers), f"model.{key}", value, "must be >= 0")
    elif key == "mlp_ratio":
        check(all(v > 0 for v in numbers), f"model.{key}", value, "must be > 0")


def model_kwargs(cls: type, section: Mapping[str, Any], **derived: Any) -> dict[str, Any]:
    """`section` (a config's model section) as keyword arguments of `Model(...)` building the Linen
    class `cls`: `name` dropped, dtype names -> dtypes, lists -> tuples, plus `derived` (attributes
    the task computes from the data, e.g. in_channels).

    Raises:
      UserError: a key that is not an attribute of `cls` (nor `variant`), naming the key and the
        attributes that exist; a size (depth, num_heads, hidden_size, patch_size, ...) < 1, a
        dropout probability outside [0, 1], a negative num_classes, mlp_ratio <= 0; a derived
        attribute also set in `section` to another value.
    """
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
    out = {}
    for key, value in dict(section).items():
        if key == "name":
            continue
        check(key in fields or key == "variant", f"model.{key}", value,
              f"is not an attribute of {cls.__name__} (attributes: {', '.join(sorted(fields))})")
        out[key] = _to_attribute(key, value)
        _check_range(key, out[key])
    for key, value in derived.items():
        check(out.get(key, value) == value, f"model.{key}", out.get(key),
              f"must be {value!r} here (set by the data and the frozen models) or left out")
        out[key] = value
    return out


def make_model(models_module, cls: type, section: Mapping[str, Any], **derived: Any) -> nn.Module:
    """`models_module.Model(**model_kwargs(cls, section, **derived))` (a `variant` key picks a
    named size, as every `genjax.models.<family>.Model` does)."""
    kwargs = model_kwargs(cls, section, **derived)
    if "variant" not in inspect.signature(models_module.Model).parameters:
        kwargs.pop("variant", None)
    return models_module.Model(**kwargs)


def replicated(tree: Any, mesh: Mesh | None) -> Any:
    """`tree` placed on every device of `mesh` (default: all devices)."""
    mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
    return jax.device_put(tree, NamedSharding(mesh, P()))


def is_model_dir(path: str) -> bool:
    """True if `path` is a folder holding a config.json (a workdir or a converted model)."""
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_frozen(path: str, *, family_name: str, mesh: Mesh | None = None):
    """`(module, params)` of a frozen model: a trained workdir (`genjax train` with model.name =
    family_name; its EMA params, `checkpoint.restore_ema`) or, for "vae", a `genjax convert
    --model vae` folder. Params are replicated over `mesh`. Only the module is built (the
    family's `make_module`), never its task, so frozen models of frozen models do not recurse.
    An unreadable newest checkpoint is skipped as in `restore` (the run's `ckpt.fallback`).

    Raises:
      UserError: `path` holds neither, or a model of another family; its checkpoints are
        unreadable (`checkpoint.restore_ema`).
    """
    from genjax import convert
    from genjax.io import checkpoint

    converted = convert.read_converted_config(path)
    if converted is not None:
        check(converted["family"] == family_name, f"task.{family_name}", path,
              f"is a converted {converted['family']!r} model, not a {family_name!r}")
        module, params = convert.load_converted(path)
        return module, replicated(nn.meta.unbox(params), mesh)
    saved = checkpoint.read_config(path)
    name = saved.get("model", {}).get("name")
    check(name == family_name, f"task.{family_name}", path,
          f"was trained with model.name={name!r}, not {family_name!r}")
    mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
    fallback = saved.get("ckpt", {}).get("fallback", True)
    return family(name).make_module(saved), checkpoint.restore_ema(path, mesh=mesh, fallback=fallback)


def restore(workdir: str, *, mesh: Mesh | None = None):
    """`(config, task, ema_params)` of the model trained in `workdir` (its config.json and the EMA
    params, with any model state merged in, of its newest checkpoint, replicated over `mesh`, default the first device). An
    unreadable newest checkpoint is skipped for the newest intact one, with a note on stderr,
    unless the run's `ckpt.fallback` is False (`checkpoint.restore_ema`).

    Raises:
      UserError: `workdir` holds no config.json or no finished checkpoint; its newest checkpoint
        is unreadable and `ckpt.fallback` is False; none is readable.
    """
    from genjax.io import checkpoint

    config = checkpoint.read_config(workdir)
    mesh = mesh or Mesh(np.asarray(jax.devices()[:1]), ("data",))
    fallback = config.get("ckpt", {}).get("fallback", True)
    params = checkpoint.restore_ema(workdir, mesh=mesh, fallback=fallback)  # first: "no checkpoint" before any build
    return config, build(config, mesh=mesh), params
