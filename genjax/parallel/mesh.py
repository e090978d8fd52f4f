"""The device mesh, batch placement and multi-process start-up.

The mesh has the axes `("data", "fsdp", "context", "tensor")` (`genjax.parallel.axes.MESH_AXES`,
tensor innermost): a batch is split over `data` x `fsdp`, the tokens of activations over `context`
(sequence parallelism: attention runs as ring or Ulysses attention, `genjax.parallel.context`),
parameters are sharded over `fsdp` (ZeRO-3 / FSDP) and over `tensor` (Megatron-style tensor
parallelism) by the logical rules in `axes.py`. The layout follows MaxText / big_vision;
`jax.sharding` does the rest.

Mesh config (a ConfigDict or mapping): `{"data": int, "fsdp": int, "context": int, "tensor": int,
"context_parallel": str}`; at most one size may be -1, which is filled so that
data * fsdp * context * tensor == number of devices. `context` may be missing (= 1, the configs
written before it existed); `context_parallel` ("ring" default, or "ulysses") is the
sequence-parallel attention used when context > 1 (`context_parallel`, `context.STRATEGIES`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check
from genjax.parallel import context
from genjax.parallel.axes import BATCH_AXES, MESH_AXES

OPTIONAL_AXES = {"context": 1}  # mesh axes a config may leave out, with their size then


def context_parallel(mesh_config: Mapping[str, Any]) -> str:
    """The config's sequence-parallel strategy, `mesh.context_parallel` (default "ring").

    Raises:
      UserError: a value not in `context.STRATEGIES`.
    """
    name = mesh_config.get("context_parallel", context.DEFAULT_STRATEGY)
    check(name in context.STRATEGIES, "mesh.context_parallel", name, f"must be one of {context.STRATEGIES}")
    return name


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, int, int, int]:
    """Resolve `mesh_config` to a concrete `(data, fsdp, context, tensor)` shape for `num_devices`
    devices (a missing `context` is 1).

    Raises:
      UserError: a size that is 0 or below -1, more than one -1, a -1 that does not divide
        evenly, a product that differs from `num_devices`, an unknown `context_parallel`.
    """
    context_parallel(mesh_config)
    sizes = [int(mesh_config[a]) if a not in OPTIONAL_AXES or a in mesh_config else OPTIONAL_AXES[a]
             for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
        check(s == -1 or s >= 1, f"mesh.{a}", s, "must be a positive size or -1 (fill)")
    check(sizes.count(-1) <= 1, "mesh", dict(zip(MESH_AXES, sizes)), "at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        i = sizes.index(-1)
        check(num_devices % known == 0, f"mesh.{MESH_AXES[i]}", -1,
              f"the other axes ({known}) must divide the device count {num_devices}")
        sizes[i] = num_devices // known
    check(math.prod(sizes) == num_devices, "mesh", dict(zip(MESH_AXES, sizes)),
          f"data*fsdp*context*tensor must equal the device count {num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the `("data", "fsdp", "context", "tensor")` mesh over `devices` (default: all of
    `jax.devices()`).

    Devices are laid out by `jax.experimental.mesh_utils.create_device_mesh` on accelerators
    (topology-aware: `tensor` innermost, on the fastest links) and in order on CPU.

    Raises:
      UserError: see `mesh_shape`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    if devices[0].platform == "cpu" or len(devices) != len(jax.devices()):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: `mesh.shape["data"] * mesh.shape["fsdp"]`."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch_size: int, mesh: Mesh, field: str = "data.batch_size") -> None:
    """Check that a global batch splits evenly over the mesh and over the processes.

    Raises:
      UserError: `global_batch_size` not positive, not divisible by data*fsdp, or not divisible
        by `jax.process_count()`.
    """
    check(global_batch_size >= 1, field, global_batch_size, "must be >= 1")
    dp = data_parallel_size(mesh)
    check(global_batch_size % dp == 0, field, global_batch_size,
          f"must be divisible by the data-parallel size data*fsdp={dp}")
    n = jax.process_count()
    check(global_batch_size % n == 0, field, global_batch_size,
          f"must be divisible by the process count {n}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch leaf: dim 0 split over (data, fsdp), other dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Put this process's part of a batch on the mesh as global arrays.

    Args:
      batch: dict of numpy arrays, each with leading dim = per-process batch size
        (global batch / `jax.process_count()`); any dtype.
      mesh: the training mesh.

    Returns:
      dict of `jax.Array` with global leading dim = per-process size * process count, sharded over
      (data, fsdp) along dim 0 (via `jax.make_array_from_process_local_data`, so it works on one
      or many hosts).

    Raises:
      UserError: the global batch size does not divide over data*fsdp or the process count.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        check_global_batch(value.shape[0] * jax.process_count(), mesh, f"batch[{name!r}].shape[0]")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start `jax.distributed` for a multi-process run; a no-op for a single process.

    Arguments default to the environment variables `JAX_COORDINATOR_ADDRESS` (host:port),
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. With no coordinator address from either, nothing
    happens (on Cloud TPU pods call `jax.distributed.initialize()` yourself, or set the variables).
    On CPU the cross-process collectives use gloo (`jax_cpu_collectives_implementation='gloo'`).
    Must run before any other JAX call.

    Returns:
      True when `jax.distributed.initialize` was called.

    Raises:
      UserError: an address without num_processes / process_id, or a process_id out of range.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return False
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    check(num_processes is not None and num_processes >= 1, "num_processes", num_processes,
          "must be >= 1 when a coordinator address is given (flag or JAX_NUM_PROCESSES)")
    check(process_id is not None and 0 <= process_id < num_processes, "process_id", process_id,
          f"must be in [0, {num_processes}) (flag or JAX_PROCESS_ID)")
    # Only the CPU backend reads this; without it CPU devices of different processes cannot
    # run collectives. Set unconditionally because the backend must not be queried yet.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
