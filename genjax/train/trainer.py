"""The trainer: `main(config, workdir)` runs mesh -> data -> init/restore -> train_step loop.

Read `main` top to bottom; the helpers above it build the pieces (train step, model, data).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check
from genjax.parallel import mesh as mesh_lib
from genjax.parallel.axes import RULES
from genjax.train import state as state_lib

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
                    grad_accum_steps: int = 1, rules=RULES):
    """Build `train_step(state, batch, rng) -> (state, metrics)`, jitted over `mesh`.

    Args:
      loss_fn: `(params, batch, rng) -> (loss, metrics)`, loss a float32 scalar mean over the
        batch, metrics a dict of float32 scalars (averaged over micro-batches).
      tx: optimizer from `state_lib.make_optimizer`.
      mesh, state_shardings: the mesh and the state's `NamedSharding` tree (from
        `create_train_state`); the state is donated, the batch is sharded over (data, fsdp).
      ema_decay, ema_warmup: see `state_lib.ema_decay_at`.
      grad_accum_steps: A; the batch (B, ...) is split into A micro-batches of B / A rows
        (micro-batch i takes rows i, i + A, i + 2A, ...; sharding of the rows is kept) whose
        gradients are averaged in a `lax.scan` before one optimizer update. Micro-batch i uses the
        key `fold_in(rng, i)` (A = 1 uses `rng` itself).

    The returned function runs under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` so
    the models' activation constraints resolve. Metrics: loss, the loss_fn's metrics, grad_norm,
    param_norm, ema_decay, finite (see `state_lib.apply_gradients`).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    micro_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    def step(state, batch, rng):
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            def split(x):
                x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
                return jax.lax.with_sharding_constraint(x.swapaxes(0, 1), micro_sharding)

            def body(acc, inputs):
                i, micro_batch = inputs
                out = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, acc, out), None

            micro_batches = jax.tree.map(split, batch)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng))
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro_batches))
            (loss, aux), grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
        state, metrics = state_lib.apply_gradients(state, grads, tx=tx, ema_decay=ema_decay,
                                                   ema_warmup=ema_warmup)
        return state, {"loss": loss, **aux, **metrics}

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)

    def train_step(state, batch, rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch, rng)

    train_step.jitted = jitted  # for `.lower(...)` (cost analysis)
    return train_step
