"""Checkpoints: orbax `CheckpointManager` over `WORKDIR/checkpoints/`, with data-iterator state.

Each checkpoint `checkpoints/<step>/` holds three orbax items:
  state   the `TrainState` (params, opt_state, ema_params, step, rng, counters), `StandardSave`;
  data    the grain iterator position per process (`grain.checkpoint.CheckpointSave`);
  config  the run's config as JSON (`JsonSave`).
Saves are asynchronous; orbax writes into a temporary directory and renames it when every item is
complete, and `latest_step` only lists finalised steps, so a run killed mid-save resumes from the
previous complete checkpoint (the leftover temporary directory is deleted on the next start,
`cleanup_tmp_directories=True`).

Restoring takes an abstract state (`jax.ShapeDtypeStruct`s carrying the *target* shardings), so
a state saved on one mesh restores onto any other (8 devices -> 4 or 1).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from genjax.errors import UserError, check


# The fields of config.ckpt: make_manager's, and `fallback` (restore the newest intact step when
# the newest is broken).
CKPT_KEYS = ("save_interval_steps", "max_to_keep", "async_save", "fallback")


def validate_ckpt(ckpt_config: Mapping[str, Any]) -> None:
    """Check config.ckpt before anything is built.

    Raises:
      UserError: an unknown key (`CKPT_KEYS`), save_interval_steps < 1, max_to_keep < 0,
        async_save or fallback not a bool.
    """
    from genjax.config import check_keys

    check_keys("ckpt", ckpt_config, CKPT_KEYS)
    check(int(ckpt_config["save_interval_steps"]) >= 1, "ckpt.save_interval_steps",
          ckpt_config["save_interval_steps"], "must be >= 1")
    check(int(ckpt_config["max_to_keep"]) >= 0, "ckpt.max_to_keep", ckpt_config["max_to_keep"],
          "must be >= 0 (0 keeps every checkpoint)")
    for key in ("async_save", "fallback"):
        value = ckpt_config.get(key, True)
        check(isinstance(value, bool), f"ckpt.{key}", value, "must be true or false")


def make_manager(workdir: str, ckpt_config: Mapping[str, Any]) -> ocp.CheckpointManager:
    """The run's `CheckpointManager` at `WORKDIR/checkpoints`.

    Config fields: `save_interval_steps` (save when step % interval == 0), `max_to_keep`
    (0 keeps all), `async_save` (bool).

    Raises:
      UserError: save_interval_steps < 1 or max_to_keep < 0.
    """
    interval = int(ckpt_config["save_interval_steps"])
    keep = int(ckpt_config["max_to_keep"])
    check(interval >= 1, "ckpt.save_interval_steps", interval, "must be >= 1")
    check(keep >= 0, "ckpt.max_to_keep", keep, "must be >= 0 (0 keeps every checkpoint)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(interval),
        enable_async_checkpointing=bool(ckpt_config["async_save"]),
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _all_finite(state: Any) -> bool:
    return bool(_finite([x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]))


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, data_iterator: Any = None,
         config: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Save `state` as checkpoint `step` if the manager's interval says so (or `force`).

    `step` is a Python int equal to `state.step` (passed in so that deciding not to save does not
    wait for the device).
    `data_iterator` is a grain `DatasetIterator` (its position is saved per process); `config`
    a JSON-serialisable dict. Returns True if a save started (it finishes in the background; call
    `manager.wait_until_finished()` before exiting).

    Raises:
      FloatingPointError: the state holds a NaN / Inf (a non-finite checkpoint is never written).
    """
    if not (force or manager.should_save(step)) or step in manager.all_steps():
        return False
    if not _all_finite(state):
        raise FloatingPointError(f"step {step}: the train state is not finite; not checkpointing it")
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        items["config"] = ocp.args.JsonSave(dict(config))
    return manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *, step: int | None = None,
            data_iterator: Any = None) -> Any:
    """Restore the state of `step` (default: newest complete checkpoint) onto `abstract_state`'s
    shardings; if `data_iterator` is given, its position is restored in place too.

    Raises:
      FileNotFoundError: no checkpoint in the manager's directory.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def saved_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """The config JSON saved with `step` (default: newest checkpoint)."""
    step = manager.latest_step() if step is None else step
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def check_same_section(saved: Mapping[str, Any], current: Mapping[str, Any], section: str) -> None:
    """Refuse to resume when `section` of the config differs from the checkpoint's.

    Raises:
      UserError: naming the first differing field `section.a.b`, the current value and the one
        saved in the checkpoint.
    """
    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}")
        elif _jsonable(a) != _jsonable(b):
            raise UserError(f"{path}={b!r}: differs from the checkpoint's {a!r}; resuming with a "
                            "changed model is not allowed (use a new --workdir)")

    walk(saved.get(section, {}), current.get(section, {}), section)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


class Preemption:
    """SIGTERM (preemption notice) sets a flag; the train loop saves at the next step and exits.

    `requested()` is True on every process once any process got the signal (an all-gather of the
    flag when there are several processes, so all of them take the same branch and save the same
    step together).
    """

    def __init__(self) -> None:
        self._flag = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(self._flag))))

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def read_config(workdir: str):
    """The `config.json` a training run wrote in `workdir`, as an (unlocked) ConfigDict.

    Raises:
      UserError: `workdir` holds no config.json (no trained model).
    """
    import json

    import ml_collections

    path = os.path.join(workdir, "config.json")
    check(os.path.isfile(path), "--workdir", workdir, "holds no trained model (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_ema(workdir: str, *, mesh: jax.sharding.Mesh | None = None) -> Any:
    """The EMA params of the newest complete checkpoint in `workdir`, replicated over `mesh`
    (default: the first device), whatever mesh they were trained on. Only the `ema_params`
    subtree is read (orbax partial restore from the checkpoint's own metadata): no model or task
    is built, so a task can load a frozen model of another task without recursion.

    Raises:
      UserError: `workdir` holds no finished checkpoint.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    step = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        manager = make_manager(workdir, {"save_interval_steps": 1, "max_to_keep": 0, "async_save": False})
        step, directory = manager.latest_step(), manager.directory
        manager.close()
    check(step is not None, "--workdir", workdir, "holds no checkpoint (no trained model)")
    path = os.path.join(os.fspath(directory), str(step), "state")
    mesh = mesh or Mesh(np.asarray(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, P())
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)["ema_params"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), tree)
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=replicated), abstract)
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item={"ema_params": abstract}, restore_args={"ema_params": restore_args}, partial_restore=True))
    return out["ema_params"]
