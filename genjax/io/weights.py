"""Reading reference checkpoints (diffusers / transformers safetensors) without torch.

`load_state_dict(src)` returns a flat `{key: np.ndarray}` from a diffusers model folder
(`diffusion_pytorch_model.safetensors` + `config.json`) or transformers folder (`model.safetensors`,
or shards listed in `model.safetensors.index.json`), a single `.safetensors` file, or an
in-memory dict (numpy arrays or torch tensors, for tests). The per-family key mapping lives in
each model file's `load_diffusers`; the helpers here check that every key is consumed once and
that shapes agree, so a state dict from another model family fails with a clear error;
`check_overrides` and `check_params_match` check a loader's keyword overrides and its finished
param tree against the module.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from genjax.errors import UserError, check

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor handed in by a test
        return v.detach().float().cpu().numpy()
    return np.asarray(v)


def load_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Load a reference state dict and its model config.

    Args:
      src: a folder holding `diffusion_pytorch_model.safetensors` (or `model.safetensors`), or
        the shards its `<name>.safetensors.index.json` lists, and optionally `config.json`; a
        `.safetensors` file (its folder's `config.json` is used if present); or a mapping of
        key -> array/tensor.

    Returns:
      (state_dict, config): float arrays as numpy (bf16/fp16 weights are upcast to float32), and
      the config dict ({} if there is none).

    Raises:
      UserError: the path does not exist or holds no safetensors file; an index names a missing shard.
    """
    if isinstance(src, Mapping):
        return {k: _to_numpy(v) for k, v in src.items()}, {}
    from safetensors.numpy import load_file

    path = os.fspath(src)
    if os.path.isdir(path):
        folder = path
        files = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))][:1]
        indexes = [os.path.join(path, f + ".index.json") for f in WEIGHT_FILES]
        indexes = [f for f in indexes if os.path.isfile(f)]
        if not files and indexes:  # sharded: {"weight_map": {key: shard file}}
            shards = sorted(set(json.load(open(indexes[0])).get("weight_map", {}).values()))
            for shard in shards:
                check(os.path.isfile(os.path.join(path, shard)), "src", path,
                      f"{os.path.basename(indexes[0])} names shard {shard!r}, which the folder lacks")
            files = [os.path.join(path, shard) for shard in shards]
        if not files:
            raise UserError(f"src={path!r}: folder holds none of {', '.join(WEIGHT_FILES)} (nor their "
                            ".index.json shards)")
        weights = files
    elif os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserError(f"src={path!r}: must be a .safetensors file or a diffusers model folder")
        folder, weights = os.path.dirname(path), [path]
    else:
        raise UserError(f"src={path!r}: no such file or folder")
    state = {}
    for file in weights:  # upcast one shard at a time: the peak is one shard's native copy
        try:
            shard = load_file(file)
        except Exception as e:  # a file that is not safetensors
            raise UserError(f"src={file!r}: not a readable safetensors file ({e})") from None
        state.update({k: (v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v)
                      for k, v in shard.items()})
        del shard
    cfg_path = os.path.join(folder, "config.json")
    config = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
    return state, config


class StateDictReader:
    """Hands out reference tensors by key and checks that every key was used exactly once.

    Example:
      r = StateDictReader(state, family="DiTTransformer2DModel")
      kernel = r.linear("proj_out.weight")       # (out, in) -> (in, out)
      r.finish()                                  # raises on unused keys

    Raises (UserError): a missing key, a shape other than expected, unused (extra) keys.
    """

    def __init__(self, state: Mapping[str, np.ndarray], family: str):
        self.state = dict(state)
        self.family = family
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self.state:
            raise UserError(f"state dict key {key!r}: missing (is this a {self.family} checkpoint?)")
        v = self.state[key]
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise UserError(f"state dict key {key!r}: shape {tuple(v.shape)} but {self.family} "
                            f"with this config needs {tuple(shape)}")
        self.used.add(key)
        return np.asarray(v, dtype=np.float32) if v.dtype.kind == "f" else v

    def has(self, key: str) -> bool:
        return key in self.state

    def linear(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        """torch Linear `prefix.weight (out, in)` [+ `prefix.bias`] -> Flax Dense params."""
        out = {"kernel": self.get(prefix + ".weight").T}
        if bias:
            out["bias"] = self.get(prefix + ".bias")
        return out

    def conv(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        """torch Conv `prefix.weight (O, I, *k)` -> Flax Conv kernel `(*k, I, O)`."""
        w = self.get(prefix + ".weight")
        out = {"kernel": np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))}
        if bias:
            out["bias"] = self.get(prefix + ".bias")
        return out

    def norm(self, prefix: str) -> dict[str, np.ndarray]:
        """torch LayerNorm / GroupNorm `weight`, `bias` -> Flax `scale`, `bias`."""
        return {"scale": self.get(prefix + ".weight"), "bias": self.get(prefix + ".bias")}

    def finish(self) -> None:
        extra = sorted(set(self.state) - self.used)
        if extra:
            more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
            raise UserError(f"state dict keys {extra[:3]}{more}: unexpected for {self.family} "
                            "with this config (wrong model family or config?)")


def check_overrides(cls: type, overrides: dict[str, Any]) -> None:
    """Raise UserError for an override that is not an attribute of the module class `cls`."""
    fields = sorted(set(cls.__dataclass_fields__) - {"parent", "name"})
    for k in overrides:
        check(k in fields, "override", k, f"must be one of {fields}")


def check_params_match(module: nn.Module, params: dict, *args: Any, family: str) -> None:
    """Raise UserError unless `params` has exactly the paths and shapes of
    `nn.unbox(module.init(key, *args)["params"])` (checked with `jax.eval_shape`, no compute)."""
    expected = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), *args))["params"])
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key in sorted(set(want) | set(got)):
        check(want.get(key) == got.get(key), f"{family} param {key}", got.get(key),
              f"the state dict gives this shape but the model with this config needs {want.get(key)}")
