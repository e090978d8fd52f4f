"""Checkpoints: orbax `CheckpointManager` over `WORKDIR/checkpoints/`, with data-iterator state.

Each checkpoint `checkpoints/<step>/` holds three orbax items:
  state   the `TrainState` (params, opt_state, ema_params, step, rng, counters, model_state),
          `StandardSave`;
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

import contextlib
import logging
import os
import signal
import sys
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from genjax.errors import UserError, check, fail


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
    (0 keeps all), `async_save` (bool), `fallback` (bool, used by `newest_intact`'s callers).

    Raises:
      UserError: save_interval_steps < 1, max_to_keep < 0 or fallback not a bool.
    """
    interval = int(ckpt_config["save_interval_steps"])
    keep = int(ckpt_config["max_to_keep"])
    fallback = ckpt_config.get("fallback", True)
    check(isinstance(fallback, bool), "ckpt.fallback", fallback, "must be True or False")
    check(interval >= 1, "ckpt.save_interval_steps", interval, "must be >= 1")
    check(keep >= 0, "ckpt.max_to_keep", keep, "must be >= 0 (0 keeps every checkpoint)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(interval),
        enable_async_checkpointing=bool(ckpt_config["async_save"]),
        cleanup_tmp_directories=True,
        create=True,
    )
    with _quiet_orbax():  # a stray step folder is reported by `newest_intact`, in one line
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


def check_same_section(saved: Mapping[str, Any], current: Mapping[str, Any], section: str,
                       *, skip: tuple[str, ...] = ()) -> None:
    """Refuse to resume when `section` of the config differs from the checkpoint's (fields whose
    dotted name is in `skip` may differ).

    Raises:
      UserError: naming the first differing field `section.a.b`, the current value and the one
        saved in the checkpoint.
    """
    def walk(a: Any, b: Any, path: str) -> None:
        if path in skip:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}.{key}")
        elif _jsonable(a) != _jsonable(b):
            raise UserError(f"{path}={b!r}: differs from the checkpoint's {a!r}; resuming with a "
                            f"changed {section} is not allowed (use a new --workdir)")

    walk(saved.get(section, {}), current.get(section, {}), section)


# Config fields that may change when a run resumes: they change neither the model nor the
# trajectory of training (num_steps only upward: that is how a run is extended; the mesh: a
# checkpoint restores onto any mesh). Every other field must equal the checkpoint's.
RESUME_MAY_CHANGE = ("num_steps", "log_every_steps", "mesh", "ckpt", "eval",
                     "optim.max_nonfinite_steps")


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], step: int | None = None,
                 ) -> None:
    """Refuse to resume a checkpoint (config `saved`) with the config `current` when a field
    outside `RESUME_MAY_CHANGE` differs (model, data, optim, diffusion, seed, ...) or when
    `num_steps` is below the checkpoint's `step` (if given).

    Raises:
      UserError: one line naming the field, its value and the checkpoint's.
    """
    if step is not None:
        check(current.get("num_steps", step) >= step, "num_steps", current.get("num_steps"),
              f"is below the checkpoint's step {step}; raise num_steps to extend the run, or use "
              "a new --workdir")
    for section in sorted(set(saved) | set(current)):
        if section not in RESUME_MAY_CHANGE:
            check_same_section(saved, current, section, skip=RESUME_MAY_CHANGE)


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


def restore_ema(workdir: str, *, mesh: jax.sharding.Mesh | None = None, fallback: bool = True) -> Any:
    """The EMA params of the newest complete checkpoint in `workdir`, replicated over `mesh`
    (default: the first device), whatever mesh they were trained on, merged with the state's
    non-gradient `model_state` collections when it has any (`{**ema_params, **model_state}`, the
    tree a task's sample_fn / evaluate take, e.g. a VQ-VAE's "vq_stats"). Only those
    subtrees are read (orbax partial restore from the checkpoint's own metadata): no model or task
    is built, so a task can load a frozen model of another task without recursion. An unreadable
    checkpoint (truncated file, stray folder) is skipped for the newest intact one when
    `fallback` (saying so on stderr), as `newest_intact` does.

    Raises:
      UserError: `workdir` holds no finished checkpoint; the newest is unreadable and not
        `fallback`; none is readable.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    manager = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        manager = make_manager(workdir, {"save_interval_steps": 1, "max_to_keep": 0, "async_save": False})
    check(manager is not None and manager.all_steps(), "--workdir", workdir,
          "holds no checkpoint (no trained model)")
    mesh = mesh or Mesh(np.asarray(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, P())

    def read(step: int) -> Any:
        from etils import epath

        path = epath.Path(manager.directory) / str(step) / "state"
        metadata = ocp.PyTreeCheckpointHandler().metadata(path)  # raises if unreadable
        with ocp.PyTreeCheckpointer() as ckptr:
            saved = getattr(metadata, "item_metadata", metadata)
            names = [n for n in ("ema_params", "model_state") if n in saved and jax.tree.leaves(saved[n])]
            abstract = {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                                        saved[n]) for n in names}
            restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=replicated), abstract)
            tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True))
            return {**tree["ema_params"], **tree.get("model_state", {})}

    try:
        _, params, _ = newest_intact(manager, read, fallback=fallback, doing="using")
    finally:
        manager.close()
    return params


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Silence orbax's absl warnings (a missing metadata file, ...) while probing checkpoints:
    a broken one is reported in one line by `newest_intact` instead."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _why(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 160 else text[:157] + "..."


def newest_intact(manager: ocp.CheckpointManager, read: Callable[[int], Any], *, fallback: bool,
                  doing: str = "resuming from", below: int | None = None,
                  ) -> tuple[int | None, Any, list[int]]:
    """`(step, read(step), broken steps)` for the newest checkpoint (at most `below`) that `read`
    reads without error; `(None, None, [])` when there is no complete checkpoint at all.

    A checkpoint that fails to read (a truncated data file or `_METADATA`, a stray
    `checkpoints/999/` folder) is broken. With `fallback` the next older one is tried, and the
    step used is noted on stderr (`... step 999 ... is unreadable (...); resuming from step 20`).

    Raises:
      UserError: naming the broken step and why, when not `fallback`; naming every broken step
        when no checkpoint is readable.
    """
    directory = os.fspath(manager.directory)
    steps = sorted((s for s in manager.all_steps() if below is None or s <= below), reverse=True)
    broken: list[tuple[int, str]] = []
    for step in steps:
        try:
            with _quiet_orbax():
                value = read(step)
        except UserError:
            raise
        except Exception as e:  # any failure to read is a broken checkpoint
            check(fallback, "checkpoint", os.path.join(directory, str(step)),
                  f"is unreadable ({_why(e)}); set --config.ckpt.fallback=True to use the newest "
                  "intact checkpoint, or move this one away")
            broken.append((step, _why(e)))
            continue
        if broken and jax.process_index() == 0:
            names = ", ".join(str(s) for s, _ in broken)
            print(f"genjax: note: checkpoint step {names} in {directory} is unreadable "
                  f"({broken[0][1]}); {doing} step {step}", file=sys.stderr, flush=True)
        return step, value, [s for s, _ in broken]
    if broken:
        fail("checkpoint", directory, "no checkpoint is readable (" + "; ".join(
            f"step {s}: {why}" for s, why in broken) + "); move the broken steps away to start "
            "from step 0")
    return None, None, []


def state_readable(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The config saved with `step`, after checking that its state's metadata reads (cheap: no
    array is read). Raises whatever orbax raises for a broken checkpoint."""
    from etils import epath

    config = saved_config(manager, step)
    # The handler, not a Checkpointer: a Checkpointer logs an unreadable _METADATA and goes on.
    ocp.PyTreeCheckpointHandler().metadata(epath.Path(manager.directory) / str(step) / "state")
    return config


def move_broken(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move broken checkpoint steps to `WORKDIR/checkpoints.broken/<step>` (kept, never deleted;
    out of orbax's way so that training can save those steps again). Process 0 moves; every
    process reloads the manager's step list."""
    if not steps:
        return
    directory = os.fspath(manager.directory)
    if jax.process_index() == 0:
        aside = directory.rstrip(os.sep) + ".broken"
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, str(step))
            n = 1
            while os.path.exists(target):
                target, n = os.path.join(aside, f"{step}.{n}"), n + 1
            os.rename(os.path.join(directory, str(step)), target)
        print(f"genjax: note: moved broken checkpoint steps {steps} to {aside}", file=sys.stderr,
              flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("genjax checkpoint.move_broken")
    manager.reload()
