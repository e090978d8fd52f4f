"""The trainer: `main(config, workdir)` runs mesh -> data -> init/restore -> train_step loop.

Read `main` top to bottom; the helpers above it build the pieces (train step, logs, samples). What
is trained (model, loss, sampler, data) comes from `genjax.tasks.build(config)`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check
from genjax.io import fs
from genjax.models.attention import describe_implementation
from genjax.parallel import context as context_lib
from genjax.parallel import mesh as mesh_lib
from genjax.parallel.axes import RULES
from genjax.train import state as state_lib
from genjax.train.metrics_log import MetricsLog
from genjax import tasks

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def check_grad_accum(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Each micro-batch must itself split over data*fsdp.

    Raises:
      UserError: grad_accum_steps < 1, not dividing the batch, or a micro-batch not divisible by
        the data-parallel size.
    """
    check(grad_accum_steps >= 1, "optim.grad_accum_steps", grad_accum_steps, "must be >= 1")
    check(global_batch_size % grad_accum_steps == 0, "optim.grad_accum_steps", grad_accum_steps,
          f"must divide data.batch_size={global_batch_size}")
    micro = global_batch_size // grad_accum_steps
    dp = mesh_lib.data_parallel_size(mesh)
    check(micro % dp == 0, "optim.grad_accum_steps", grad_accum_steps,
          f"micro-batch {micro} = data.batch_size / grad_accum_steps must be divisible by "
          f"data*fsdp={dp}")


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: Mesh,
                    state_shardings: state_lib.TrainState, ema_decay: float, ema_warmup: bool,
                    grad_accum_steps: int = 1, lr_schedule: optax.Schedule | None = None,
                    rules=RULES, context_parallel: str = context_lib.DEFAULT_STRATEGY, frozen=None):
    """Build `train_step(state, batch, rng) -> (state, metrics)`, jitted over `mesh`.

    Args:
      loss_fn: `(params, batch, rng) -> (loss, metrics)`, loss a float32 scalar mean over the
        batch, metrics a dict of float32 scalars (averaged over micro-batches); params hold the
        state's model_state too, updated through `metrics[state.MODEL_STATE]` (`state_lib.loss_and_grads`).
      tx: optimizer from `state_lib.make_optimizer`.
      mesh, state_shardings: the mesh and the state's `NamedSharding` tree (from
        `create_train_state`); the state is donated, the batch is sharded over (data, fsdp).
      ema_decay, ema_warmup: see `state_lib.ema_decay_at`.
      grad_accum_steps: A micro-batches whose gradients are averaged before one optimizer update
        (`state_lib.loss_and_grads`; the sharding of the rows is kept).
      lr_schedule: if given, metrics include "lr", the rate of this step's update
        (`lr_schedule(updates applied so far)`, the count optax keeps).
      context_parallel: "ring" or "ulysses", the sequence-parallel self-attention when the mesh's
        `context` axis is > 1 (config `mesh.context_parallel`, `genjax.parallel.context`).
      frozen: `Task.frozen`, a dict of placed arrays loss_fn sees in its params (`{**params,
        **frozen}`), not differentiated: an argument of the compiled step with its own sharding
        (bound by train_step and by `lower(...).compile()`), never a constant in the program.

    The returned function traces under `jax.set_mesh(mesh)`, `nn.logical_axis_rules(rules)` and
    `context.strategy(context_parallel)`, so the models' activation constraints
    (`nn.with_logical_constraint`, e.g. tokens `(batch, length, None)` -> batch over data x fsdp,
    tokens over context) are sharding constraints in the compiled step (tests/train/test_trainer.py
    reads them in the lowered HLO) and attention runs sequence-parallel when context > 1. `train_step.lower(state,
    batch, rng)` lowers it the same way (for ahead-of-time compilation and XLA cost analysis). Metrics: loss, the
    loss_fn's metrics, grad_norm, param_norm, ema_decay, finite, nonfinite_steps,
    nonfinite_streak (see `state_lib.apply_gradients`).
    """
    frozen = dict(frozen or {})
    micro_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    def step(state, batch, rng, frozen):
        loss, aux, grads, model_state = state_lib.loss_and_grads(
            loss_fn, state.params, state.model_state, batch, rng, frozen=frozen,
            grad_accum_steps=grad_accum_steps, micro_sharding=micro_sharding)
        if lr_schedule is not None:
            aux = {**aux, "lr": lr_schedule(state.step - state.nonfinite_count)}
        state, metrics = state_lib.apply_gradients(state, grads, tx=tx, ema_decay=ema_decay,
                                                   ema_warmup=ema_warmup, model_state=model_state)
        return state, {"loss": loss, **aux, **metrics}

    replicated = NamedSharding(mesh, P())
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    jitted = jax.jit(step, in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated,
                                         frozen_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def train_step(state, batch, rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), context_lib.strategy(context_parallel):
            return jitted(state, batch, rng, frozen)

    def lower(state, batch, rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), context_lib.strategy(context_parallel):
            return _Bound(jitted.lower(state, batch, rng, frozen), frozen)

    train_step.lower = lower
    return train_step


class _Bound:
    """A lowered (or compiled) train step with its frozen argument bound: `compile()` and calls
    take `(state, batch, rng)` as `train_step` does; anything else is the wrapped object's."""

    def __init__(self, inner, frozen):
        self.inner, self.frozen = inner, frozen

    def compile(self, *args, **kw):
        return _Bound(self.inner.compile(*args, **kw), self.frozen)

    def __call__(self, state, batch, rng):
        return self.inner(state, batch, rng, self.frozen)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# --------------------------------------------------------------------------- config, data, logs

def validate(config) -> None:
    """Config checks that need no devices (the mesh-dependent ones run once the mesh exists).

    Raises:
      UserError: a key that nothing reads, in any section (`tasks.check_keys`,
        `state.validate_optim`, `checkpoint.validate_ckpt`, `mesh.validate_mesh`); the model
        section's errors (`tasks.validate`: unknown model name or dtype, a missing frozen-model
        path, ...); num_steps < 1, log_every_steps < 1; an optim number out of range (lr <= 0,
        ema_decay outside [0, 1], ...); a bad ckpt or mesh value; eval.sample_every_steps < 0,
        eval.num_samples < 1.
    """
    from genjax.io import checkpoint

    tasks.check_keys(config)
    tasks.validate(config)
    check(config.num_steps >= 1, "num_steps", config.num_steps, "must be >= 1")
    check(config.log_every_steps >= 1, "log_every_steps", config.log_every_steps, "must be >= 1")
    state_lib.validate_optim(config.optim, config.num_steps)
    checkpoint.validate_ckpt(config.ckpt)
    mesh_lib.validate_mesh(config.mesh)
    check(config.eval.sample_every_steps >= 0, "eval.sample_every_steps",
          config.eval.sample_every_steps, "must be >= 0 (0 disables samples)")
    check(config.eval.num_samples >= 1, "eval.num_samples", config.eval.num_samples, "must be >= 1")


class NonFiniteError(RuntimeError):
    """Training stopped: `optim.max_nonfinite_steps` consecutive steps had NaN / Inf gradients."""


# Peak dense bf16 FLOP/s per device, from the vendors' data sheets; None (no MFU) elsewhere.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def step_flops(compiled) -> float | None:
    """FLOPs per device of one compiled train step (XLA cost analysis), or None if unknown."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


def write_samples(task: tasks.Task, params, rng: jax.Array, workdir: str, step: int,
                  log: MetricsLog) -> None:
    """The task's samples -> WORKDIR/samples/step_XXXXXX.png (images, a grid) or .gif (videos),
    and its evaluation metrics -> a metrics record `{"step": step, **metrics}`."""
    from genjax.io import media

    with nn.logical_axis_rules(RULES):
        out = None if task.sample_fn is None else np.asarray(task.sample_fn(params, rng))
        metrics = None if task.evaluate is None else task.evaluate(params)
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "samples", f"step_{step:06d}")
    if out is not None and out.ndim == 5:
        media.write_gif(path + ".gif", out)
    elif out is not None:
        media.write_png_grid(path + ".png", out)
    if metrics:
        log.write({"step": step, **metrics})


# --------------------------------------------------------------------------- main

def main(config, workdir: str, *, devices=None) -> dict[str, Any]:
    """Train `config` in `workdir`, resuming from its newest complete checkpoint if there is one.

    The run holds `WORKDIR/.lock` (host, pid, start time; `genjax.io.lock`) from start to end,
    also after an error or a preemption save: a second run into the same workdir fails at once.
    A stale lock (same host, process gone) is taken over with a note on stderr. In a multi-host
    run process 0 takes it for all.

    Resuming: every config field must equal the checkpoint's except `num_steps` (upward only:
    that is how a run is extended; fewer steps than the checkpoint's is refused), `log_every_steps`,
    `mesh` (a checkpoint restores onto any mesh), `ckpt`, `eval` and `optim.max_nonfinite_steps`
    (`checkpoint.RESUME_MAY_CHANGE`): a changed model, data (e.g. batch_size), optim, diffusion or
    seed would silently change what is trained. An unreadable checkpoint (truncated file, stray
    `checkpoints/999/`) is named in one line; with `ckpt.fallback` (default True) the newest
    intact step is used instead, said so on stderr, and the broken ones are moved to
    `WORKDIR/checkpoints.broken/`. A workdir with an interrupted run but no complete checkpoint
    starts from step 0 with a note saying so.

    `devices`: the devices of the mesh (default all of `jax.devices()`).

    The model, its loss, sampler and data come from `tasks.build(config)` (any of
    `tasks.MODEL_NAMES`). Writes WORKDIR/config.json, checkpoints/, metrics.jsonl, tb/ and
    samples/step_XXXXXX.png (images) or .gif (videos) every eval.sample_every_steps, with the
    task's evaluation metrics (if any) logged as a record `{"step", **metrics}` at the same
    steps (process 0 writes logs and media). Returns the last logged metrics record.

    Prints one line per process: its index and count, local and global devices, the mesh shape.

    Raises:
      UserError (before anything compiles): hosts with different configs (every process of a
        multi-process run must pass the same `config`), a bad config value, a mesh that does not
        match the devices, a batch that does not split over the mesh or the processes, a
        checkpoint in `workdir` whose config differs from `config` (see Resuming above), or
        has a later step than num_steps; `workdir` locked by another run, or not a writable
        folder; an unreadable checkpoint without `ckpt.fallback`, or no readable checkpoint.
      NonFiniteError: `optim.max_nonfinite_steps` consecutive steps had non-finite gradients.
    """
    from genjax.io import lock

    with lock.hold(workdir, enabled=jax.process_index() == 0):
        return _train(config, workdir, devices)


def _train(config, workdir: str, devices) -> dict[str, Any]:
    """`main` under the workdir lock."""
    from tqdm import tqdm

    from genjax.io import checkpoint

    # 1. Config and mesh: every user error is raised here, before anything compiles. Hosts
    #    compare configs first, so that the checks below fail alike on every host.
    config_dict = config.to_dict()
    mesh_lib.check_same_on_all_hosts("config", config_dict)
    validate(config)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    context_parallel = mesh_lib.context_parallel(config.mesh)
    print(mesh_lib.describe(mesh), flush=True)
    print(describe_implementation(config.model.get("attention_impl", "auto"), mesh.devices.flat[0].platform),
          flush=True)
    mesh_lib.check_global_batch(config.data.batch_size, mesh)
    check_grad_accum(config.data.batch_size, config.optim.grad_accum_steps, mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    interrupted = (os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
                   or os.path.exists(os.path.join(workdir, "metrics.jsonl")))
    manager = checkpoint.make_manager(workdir, config.ckpt)
    fallback = config.ckpt.get("fallback", True)
    resume_step, saved, broken = checkpoint.newest_intact(
        manager, lambda s: checkpoint.state_readable(manager, s), fallback=fallback)
    if resume_step is not None:  # num_steps is checked against the step restored, below
        checkpoint.check_resume(saved, config_dict)
    elif interrupted and jax.process_index() == 0:
        print(f"genjax: note: no complete checkpoint in {ckpt_dir}, starting from step 0",
              file=sys.stderr, flush=True)

    # 2. Model, optimizer, data.
    task = tasks.build(config, mesh=mesh)
    init_params, loss_fn, init_state = task.init_params, task.loss_fn, task.init_state
    tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
    data = task.make_data(workdir)

    # 3. Fresh state, or the newest checkpoint restored onto this mesh (with the data position).
    if resume_step is None:
        state, shardings = state_lib.create_train_state(init_params, tx, seed=config.seed, mesh=mesh,
                                                        init_state=init_state)
    else:
        abstract, shardings = state_lib.abstract_train_state(init_params, tx, seed=config.seed,
                                                             mesh=mesh, init_state=init_state)
        resume_step, state, more = checkpoint.newest_intact(
            manager, lambda s: checkpoint.restore(manager, abstract, step=s, data_iterator=data),
            fallback=fallback, below=resume_step)
        broken += more
        checkpoint.check_resume(saved, config_dict, resume_step)
    checkpoint.move_broken(manager, broken)
    train_step = make_train_step(
        loss_fn, tx, mesh=mesh, state_shardings=shardings, ema_decay=config.optim.ema_decay,
        ema_warmup=config.optim.ema_warmup, grad_accum_steps=config.optim.grad_accum_steps,
        lr_schedule=lr_schedule, context_parallel=context_parallel, frozen=task.frozen)

    # 4. Logs.
    first_step = resume_step or 0
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        fs.write_json(os.path.join(workdir, "config.json"), config_dict, "config.json", indent=2)
    log = MetricsLog(workdir, first_step)
    preemption = checkpoint.Preemption()
    sample_rng = jax.random.fold_in(jax.random.split(state.rng)[0], 1)
    peak = PEAK_FLOPS.get(mesh.devices.flat[0].device_kind)

    # 5. The loop. Step s's metrics are read after step s + 1 is dispatched, so the host never
    #    waits on the device except at checkpoints and samples.
    compiled = flops = previous = record = None
    clock, clock_step = time.perf_counter(), first_step
    bar = tqdm(range(first_step, config.num_steps), initial=first_step, total=config.num_steps,
               disable=not is_main, desc="train")

    def report(done: int, metrics: dict[str, jax.Array]) -> dict[str, Any] | None:
        nonlocal clock, clock_step
        metrics = jax.device_get(metrics)
        if int(metrics["nonfinite_streak"]) >= config.optim.max_nonfinite_steps:
            raise NonFiniteError(
                f"step {done}: {int(metrics['nonfinite_streak'])} consecutive steps with NaN/Inf "
                f"gradients (optim.max_nonfinite_steps={config.optim.max_nonfinite_steps}); "
                f"stopping. The last checkpoint holds finite weights.")
        if done % config.log_every_steps and done != config.num_steps:
            return None
        now = time.perf_counter()
        steps_per_sec = (done - clock_step) / max(now - clock, 1e-9)
        clock, clock_step = now, done
        rec = {"step": done, **{k: float(v) for k, v in metrics.items() if k != "finite"}}
        # A packed batch counts its real examples and tokens (the logged step's, per micro-batch).
        per_step = config.optim.grad_accum_steps
        rec["examples_per_sec"] = steps_per_sec * rec.pop("examples", config.data.batch_size / per_step) * per_step
        if "tokens" in rec:
            rec["tokens_per_sec"] = steps_per_sec * rec.pop("tokens") * per_step
        rec["mfu"] = flops * steps_per_sec / peak if flops and peak else None
        rec["nonfinite_steps"] = int(metrics["nonfinite_steps"])
        rec.pop("nonfinite_streak")
        log.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", ex_per_s=f"{rec['examples_per_sec']:.0f}")
        return rec

    try:
        for step in bar:
            batch = mesh_lib.shard_batch(next(data), mesh)
            rng = jax.random.fold_in(state.rng, step)
            if compiled is None:
                compiled = train_step.lower(state, batch, rng).compile()
                flops = step_flops(compiled)
            state, metrics = compiled(state, batch, rng)
            done = step + 1
            if previous is not None:
                record = report(*previous) or record
            previous = (done, metrics)
            checkpoint.save(manager, done, state, data_iterator=data, config=config_dict)
            every = config.eval.sample_every_steps
            if every and done % every == 0:
                write_samples(task, {**state.ema_params, **state.model_state}, sample_rng, workdir, done, log)
            if preemption.requested():
                bar.write(f"SIGTERM: saving step {done} and stopping")
                break
        if previous is not None:
            record = report(*previous) or record
            checkpoint.save(manager, previous[0], state, data_iterator=data, config=config_dict,
                            force=True)
    finally:
        manager.wait_until_finished()
        manager.close()
        preemption.restore_handler()
        log.close()
        bar.close()
    return record or {}


def cli_main(args) -> int:
    """`genjax train --config FILE[:ARG] --workdir DIR [--config.a.b=v ...]`.

    Starts `jax.distributed` first when the environment describes several processes (SLURM,
    Open MPI, a Cloud TPU slice of several hosts, or JAX_COORDINATOR_ADDRESS etc.; see
    `mesh_lib.initialize_distributed`). Exit status 0 on success or after a preemption save, 1
    when training diverged (NonFiniteError, one line on stderr); user errors are printed by the
    CLI (status 2).
    """
    import sys

    from genjax.config import load_config

    config = load_config(args.config, args.overrides)
    mesh_lib.initialize_distributed()
    fs.check_writable_dir(args.workdir, "--workdir")  # a file, a read-only disk: before any work
    try:  # main creates the workdir when it takes its lock
        main(config, args.workdir)
    except NonFiniteError as e:
        print(f"genjax train: error: {e}", file=sys.stderr)
        return 1
    return 0
