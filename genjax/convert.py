"""`genjax convert`: reference weights (diffusers) -> an orbax checkpoint + `config.json`.

    genjax convert --from diffusers --model dit|vae|unet SRC --out DIR

SRC is a diffusers model folder (`diffusion_pytorch_model.safetensors` + `config.json`) or a
`.safetensors` file. DIR receives `params/` (an orbax checkpoint of the float32 params tree) and
`config.json` = `{"family": ..., "kwargs": {module attributes}, "source": SRC, "sample_size": S}`
(S: the reference config's `sample_size` — the DiT's latent side, the U-Net's image side — or
null when SRC is a bare .safetensors file). Weights are read
with numpy (no torch). `load_converted(DIR)` rebuilds `(module, params)`; the sampler loads
converted weights through it.
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
            "unet": ("genjax.models.unet", "UNet"), "vqvae": ("genjax.models.vqvae", "VQVAE")}
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
        overwritten), or is a file or cannot be written (checked before reading `src`).
    """
    import orbax.checkpoint as ocp

    mod = _family(family)
    check(not (os.path.isdir(out) and os.listdir(out)), "--out", out,
          "must be a new or empty folder (existing files are never overwritten)")
    fs.check_writable_dir(out, "--out")  # a file, a read-only disk: before reading the weights
    module, params = mod.load_diffusers(src)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:  # writes to a temp dir and renames when complete
        ckptr.save(os.path.join(out, PARAMS_DIR), params)
    config = {"family": family, "kwargs": module_kwargs(module), "source": os.fspath(src),
              "sample_size": _reference_sample_size(src)}
    fs.write_json(os.path.join(out, CONFIG_FILE), config, "--out", indent=2)
    return out


def load_converted(path: str):
    """`(module, params)` from a folder written by `convert`.

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
