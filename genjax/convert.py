"""`genjax convert`: reference weights (diffusers) -> an orbax checkpoint + `config.json`.

    genjax convert --from diffusers --model dit|vae|unet|wan_vae SRC --out DIR
    genjax convert --from diffusers --model wan PIPELINE --out DIR

SRC is a diffusers model folder (`diffusion_pytorch_model.safetensors` + `config.json`) or a
`.safetensors` file. DIR receives `params/` (an orbax checkpoint of the float32 params tree) and
`config.json` = `{"family": ..., "kwargs": {module attributes}, "source": SRC, "sample_size": S}`
(S: the reference config's `sample_size` — the DiT's latent side, the U-Net's image side — or
null when SRC is a bare .safetensors file). Weights are read
with numpy (no torch). `load_converted(DIR)` rebuilds `(module, params)`; the sampler loads
converted weights through it.

`--model wan` takes a whole diffusers Wan 2.1 text-to-video pipeline folder (`model_index.json`,
`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; e.g.
Wan-AI/Wan2.1-T2V-1.3B-Diffusers) and writes, with the same conventions:

    DIR/config.json     family "wan", the `WanTransformer` kwargs, and "scheduler": {"flow_shift",
                        "num_train_timesteps", "class"} read from scheduler_config.json
                        (FlowMatchEulerDiscreteScheduler `shift`, or UniPCMultistepScheduler
                        `flow_shift` with use_flow_sigmas), "vae": "vae", "text_encoder": "text_encoder"
    DIR/params/         the transformer (orbax)
    DIR/vae/            a `--model wan_vae` folder (config.json + params/) of `WanVAE`
    DIR/text_encoder/   NOT converted: symbolic links to the pipeline's text_encoder/ files
                        (config.json, safetensors shards) and tokenizer/tokenizer.json, so the
                        ~11 GB umT5-XXL is not copied; `tasks.text_encoders` reads it as a
                        transformers umT5 folder. Keep the pipeline folder where it is.

The folder is built under a temporary name beside DIR and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check
from genjax.io import fs

# Model families with a diffusers reference format: name -> (module path, Linen class); each module
# has `load_diffusers` and `Model(**kwargs)`.
FAMILIES = {"dit": ("genjax.models.dit", "DiT"), "vae": ("genjax.models.vae", "AutoencoderKL"),
            "unet": ("genjax.models.unet", "UNet"), "wan": ("genjax.models.wan", "WanTransformer"),
            "wan_vae": ("genjax.models.wan_vae", "WanVAE"), "vqvae": ("genjax.models.vqvae", "VQVAE")}
# Families whose SRC is a whole diffusers pipeline folder, not one model: name -> converter.
PIPELINE_FAMILIES = ("wan",)
WAN_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _family(name: str):
    check(name in FAMILIES, "--model", name, f"must be one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name][0])


def module_kwargs(module) -> dict[str, Any]:
    """The module's constructor attributes as JSON-able values (dtypes become their names)."""
    out = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name") or not f.init:
            continue
        v = getattr(module, f.name)
        if isinstance(v, type) or hasattr(v, "dtype") and not isinstance(v, np.ndarray):
            v = jnp.dtype(v).name
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _restore_kwargs(module_cls, kwargs: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(module_cls)}
    out = {}
    for k, v in kwargs.items():
        if k in ("dtype", "param_dtype"):
            v = jnp.dtype(v)
        elif isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        check(k in fields, f"config.json kwargs.{k}", v, f"not an attribute of {module_cls.__name__}")
        out[k] = v
    return out


def _reference_sample_size(src: str) -> int | None:
    """`sample_size` from the diffusers config.json beside the weights (an int, or the first of a
    pair), or None."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        size = json.load(f).get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) if isinstance(size, int) else None


def read_converted_config(path: str) -> dict[str, Any] | None:
    """The `config.json` of a `convert` output folder, or None if `path` is not one."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        config = json.load(f)
    return config if "family" in config and "kwargs" in config else None


def convert(family: str, src: str, out: str) -> str:
    """Convert `src` (diffusers format) of `family` into `out`; returns `out`.

    Raises:
      UserError: unknown family, unreadable source or a state dict of another family (named by
        key, from the family's `load_diffusers`), or `out` that already holds files (never
        overwritten), or is a file or cannot be written (checked before reading `src`); for "wan",
        a folder that is not a Wan 2.1 text-to-video pipeline (`_check_wan_pipeline`, before any
        weights are read) or an unsupported scheduler (`wan_scheduler`).
    """
    mod = _family(family)
    check(not (os.path.isdir(out) and os.listdir(out)), "--out", out,
          "must be a new or empty folder (existing files are never overwritten)")
    fs.check_writable_dir(out, "--out")  # a file, a read-only disk: before reading the weights
    if family in PIPELINE_FAMILIES:
        return _convert_wan(src, out)
    module, params = mod.load_diffusers(src)
    return _write(os.path.abspath(out), family, module, params, src, sample_size=_reference_sample_size(src))


def _write(out: str, family: str, module, params, src: str, **extra) -> str:
    """`out/params/` (orbax) and `out/config.json` of one converted model; returns `out`."""
    import orbax.checkpoint as ocp

    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:  # writes to a temp dir and renames when complete
        ckptr.save(os.path.join(out, PARAMS_DIR), params)
    config = {"family": family, "kwargs": module_kwargs(module), "source": os.fspath(src), **extra}
    fs.write_json(os.path.join(out, CONFIG_FILE), config, "--out", indent=2)
    return out


def _read_json(path: str, field: str, value: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{field}={value!r}: {os.path.basename(path)} is not readable JSON "
                        f"({' '.join(str(e).split())})") from None
    check(isinstance(out, dict), field, value, f"{os.path.basename(path)} is not a JSON object")
    return out


def wan_scheduler(src: str) -> dict[str, Any]:
    """`{"class", "flow_shift", "num_train_timesteps"}` of a Wan pipeline's scheduler_config.json:
    FlowMatchEulerDiscreteScheduler (`shift`, static shifting) or UniPCMultistepScheduler with
    `use_flow_sigmas` (`flow_shift`; the Wan2.1-*-Diffusers default). Both sample on the grid
    s = shift(linspace(1, shift(1 / T), S)) (T = num_train_timesteps, shift(u) = k u / (1 + (k - 1) u)).

    Raises:
      UserError: another scheduler class, dynamic shifting, a UniPC without flow sigmas or flow
        prediction, a shift <= 0.
    """
    cfg = _read_json(os.path.join(src, "scheduler", "scheduler_config.json"), "SRC", src)
    cls = cfg.get("_class_name")
    if cls == "FlowMatchEulerDiscreteScheduler":
        check(not cfg.get("use_dynamic_shifting", False), "scheduler use_dynamic_shifting", True,
              "is not supported (Wan uses a fixed shift)")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                    "stochastic_sampling"):
            check(not cfg.get(key, False), f"scheduler {key}", cfg.get(key), "must be false (Wan's flow grid)")
        shift = cfg.get("shift", 1.0)
    elif cls == "UniPCMultistepScheduler":
        check(cfg.get("use_flow_sigmas", False) and cfg.get("prediction_type") == "flow_prediction",
              "scheduler", cls, "must have use_flow_sigmas=true and prediction_type='flow_prediction' (Wan 2.1)")
        shift = cfg.get("flow_shift", 1.0)
    else:
        raise UserError(f"SRC={src!r}: scheduler/scheduler_config.json has _class_name={cls!r}; want "
                        "FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler (Wan 2.1 text-to-video)")
    check(isinstance(shift, (int, float)) and shift > 0, "scheduler flow_shift", shift, "must be a number > 0")
    return {"class": cls, "flow_shift": float(shift), "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}


def _check_wan_pipeline(src: str) -> None:
    """Refuse, before reading weights, a folder that is not a Wan 2.1 text-to-video pipeline."""
    check(os.path.isdir(src), "SRC", src, "must be a diffusers Wan pipeline folder (model_index.json, "
          f"{', '.join(s + '/' for s in WAN_SUBFOLDERS)})")
    check(os.path.isfile(os.path.join(src, "model_index.json")), "SRC", src,
          "holds no model_index.json (want a diffusers Wan pipeline folder, e.g. Wan2.1-T2V-1.3B-Diffusers)")
    index = _read_json(os.path.join(src, "model_index.json"), "SRC", src)
    cls = index.get("_class_name")
    check(cls == "WanPipeline", "SRC", src, f"model_index.json has _class_name={cls!r}; only text-to-video "
          "'WanPipeline' folders are supported (image-to-video and Wan 2.2 are not)")
    second = index.get("transformer_2")
    check(not (isinstance(second, list) and second[0]), "SRC", src,
          "has a transformer_2 (Wan 2.2 two-stage denoising), which is not supported")
    for sub in WAN_SUBFOLDERS:
        check(os.path.isdir(os.path.join(src, sub)), "SRC", src, f"has no {sub}/ subfolder")
    tcfg = _read_json(os.path.join(src, "transformer", CONFIG_FILE), "SRC", src) \
        if os.path.isfile(os.path.join(src, "transformer", CONFIG_FILE)) else {}
    for key in ("image_dim", "added_kv_proj_dim"):
        check(tcfg.get(key) is None, "SRC", src, f"transformer/config.json has {key}={tcfg.get(key)!r}: an "
              "image-to-video transformer; only text-to-video Wan is supported")
    ecfg = os.path.join(src, "text_encoder", CONFIG_FILE)
    check(os.path.isfile(ecfg), "SRC", src, "text_encoder/ holds no config.json")
    model_type = _read_json(ecfg, "SRC", src).get("model_type")
    check(model_type in ("t5", "mt5", "umt5"), "SRC", src,
          f"text_encoder/config.json has model_type={model_type!r}; want 'umt5' (UMT5EncoderModel)")
    check(os.path.isfile(os.path.join(src, "tokenizer", "tokenizer.json")), "SRC", src,
          "tokenizer/ holds no tokenizer.json (write one where transformers is installed: "
          "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    check(os.path.isfile(os.path.join(src, "scheduler", "scheduler_config.json")), "SRC", src,
          "scheduler/ holds no scheduler_config.json")


def _convert_wan(src: str, out: str) -> str:
    """`--model wan`: a diffusers WanPipeline folder -> `out` (see the module docstring)."""
    import shutil
    import tempfile

    from genjax.models import wan, wan_vae

    _check_wan_pipeline(src)
    src, out = os.path.abspath(src), os.path.abspath(out)
    scheduler = wan_scheduler(src)
    module, params = wan.load_diffusers(os.path.join(src, "transformer"))
    vae_module, vae_params = wan_vae.load_diffusers(os.path.join(src, "vae"))
    check(vae_module.z_dim == module.in_channels, "SRC", src, f"vae z_dim {vae_module.z_dim} != transformer "
          f"in_channels {module.in_channels}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=os.path.dirname(out))
    try:
        _write(os.path.join(tmp, "vae"), "wan_vae", vae_module, vae_params, os.path.join(src, "vae"))
        text = os.path.join(tmp, "text_encoder")
        os.makedirs(text)
        for name in sorted(os.listdir(os.path.join(src, "text_encoder"))):
            os.symlink(os.path.join(src, "text_encoder", name), os.path.join(text, name))
        os.symlink(os.path.join(src, "tokenizer", "tokenizer.json"), os.path.join(text, "tokenizer.json"))
        _write(tmp, "wan", module, params, src, sample_size=None, scheduler=scheduler, vae="vae",
               text_encoder="text_encoder")
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except OSError as e:
        raise fs.write_error("--out", out, e, None) from e
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out


def load_converted(path: str):
    """`(module, params)` from a folder written by `convert` (for `--model wan`: the transformer;
    its VAE is `load_converted(path/vae)`).

    Raises:
      UserError: no `config.json` / `params/` in `path`, or an unknown family.
    """
    import orbax.checkpoint as ocp

    cfg_path = os.path.join(path, CONFIG_FILE)
    check(os.path.isfile(cfg_path), "path", path, f"holds no {CONFIG_FILE} (not a genjax convert output)")
    with open(cfg_path) as f:
        config = json.load(f)
    mod = _family(config["family"])
    module_cls = getattr(mod, FAMILIES[config["family"]][1])
    module = mod.Model(**_restore_kwargs(module_cls, config["kwargs"]))
    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    check(os.path.isdir(params_dir), "path", path, f"holds no {PARAMS_DIR}/ checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(params_dir)
    return module, params


def main(args) -> int:
    if not os.path.exists(args.src):
        raise UserError(f"SRC={args.src!r}: no such file or folder")
    out = convert(args.model, args.src, args.out)
    print(f"wrote {out}: {args.model} params (orbax) + {CONFIG_FILE}")
    return 0
