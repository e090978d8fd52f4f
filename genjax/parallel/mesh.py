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

Multi-process start-up: `initialize_distributed()` starts `jax.distributed` when the environment
describes several processes (`cluster_from_env`: SLURM `srun` with more than one task, Open MPI
`mpirun`, a Cloud TPU slice of several hosts, or JAX_COORDINATOR_ADDRESS) and does nothing for
one process, so the same command runs on a laptop, a TPU pod or a SLURM GPU cluster. The trainer
then prints `describe(mesh)` on every process and calls `check_same_on_all_hosts("config", ...)`,
which stops every process with one line when the hosts' configs differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.errors import check, fail
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


MESH_KEYS = (*MESH_AXES, "context_parallel")  # the fields of config.mesh


def validate_mesh(mesh_config: Mapping[str, Any]) -> None:
    """The checks of config.mesh that need no devices: its keys (`MESH_KEYS`), each size a
    positive int or -1, `context_parallel`.

    Raises:
      UserError: an unknown key, a size that is 0 or below -1, an unknown context_parallel.
    """
    from genjax.config import check_keys

    check_keys("mesh", mesh_config, MESH_KEYS)
    context_parallel(mesh_config)
    for a in MESH_AXES:
        if a in mesh_config:
            s = mesh_config[a]
            check(isinstance(s, int) and (s == -1 or s >= 1), f"mesh.{a}", s,
                  "must be a positive size or -1 (fill)")


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, int, int, int]:
    """Resolve `mesh_config` to a concrete `(data, fsdp, context, tensor)` shape for `num_devices`
    devices (a missing `context` is 1).

    Raises:
      UserError: an unknown key, a size that is 0 or below -1, more than one -1, a -1 that does
        not divide evenly, a product that differs from `num_devices`, an unknown `context_parallel`.
    """
    validate_mesh(mesh_config)
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


def _count(value: str | None) -> int:
    return int(value) if value and value.strip().isdigit() else 0


def cluster_from_env(env: Mapping[str, str]) -> str | None:
    """The multi-process launcher that `env` (e.g. `os.environ`) describes, or None for one process.

    Pure: reads only `env`. The signals are the ones `jax.distributed.initialize()` detects
    (`jax._src.clusters`), counted so that a one-process job of any kind is None.

    Returns:
      "jax": JAX_COORDINATOR_ADDRESS is set (JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest).
      "slurm": SLURM_PROCID is set and the task count, SLURM_STEP_NUM_TASKS (the `srun` step) or
        else SLURM_NTASKS, is above 1.
      "ompi": OMPI_COMM_WORLD_SIZE above 1 under Open MPI's ORTE launcher (OMPI_MCA_orte_hnp_uri
        set: `mpirun` of Open MPI 4 and older).
      "mpi4py": OMPI_COMM_WORLD_SIZE above 1 without it (Open MPI 5); JAX then needs mpi4py.
      "tpu": a Cloud TPU slice of more than one host as GKE describes it, TPU_PROCESS_ADDRESSES or
        else TPU_WORKER_HOSTNAMES listing more than one comma-separated host, or a multislice job
        (MEGASCALE_NUM_SLICES above 1). (A TPU VM created with gcloud keeps its host list in the
        metadata server; `initialize_distributed` asks it.)
      None: none of these.
    """
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "jax"
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in env and _count(tasks) > 1:
        return "slurm"
    if _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "ompi" if "OMPI_MCA_orte_hnp_uri" in env else "mpi4py"
    hosts = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES", ""))
    if len(hosts.split(",")) > 1 or _count(env.get("MEGASCALE_NUM_SLICES")) > 1:
        return "tpu"
    return None


def _gcloud_tpu_vm_hosts() -> int:
    """Hosts in this Cloud TPU slice from the TPU VM's metadata server; 1 off a TPU VM (no network
    call then). JAX has no public API for this, so it asks the detector `jax.distributed` uses."""
    from jax._src import cloud_tpu_init, clusters

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return 1
    try:
        tpu = clusters.GceTpuCluster
        return tpu.get_process_count() if tpu.is_env_present() else 1
    except (OSError, RuntimeError, ValueError):  # no metadata server (requests' errors are
        # OSErrors): libtpu alone joins the hosts, as it does without jax.distributed
        return 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start `jax.distributed` when this is one of several processes; a no-op for a single process.

    Must run before any other JAX call. Which case applies (`cluster_from_env(os.environ)`):
      - `coordinator_address` given, or JAX_COORDINATOR_ADDRESS set: that address, with
        `num_processes` / `process_id` defaulting to JAX_NUM_PROCESSES / JAX_PROCESS_ID.
      - SLURM (`srun` with more than one task), Open MPI (`mpirun -n N`, N > 1), a Cloud TPU slice
        of more than one host (GKE variables, multislice, or a TPU VM's metadata server):
        `jax.distributed.initialize()` finds the coordinator, process count and id itself.
      - anything else: nothing happens.
    On CPU the cross-process collectives use gloo (`jax_cpu_collectives_implementation='gloo'`).

    Returns:
      True when `jax.distributed.initialize` was called.

    Raises:
      UserError: an explicit address without num_processes / process_id, or a process_id out of
        range.
    """
    kind = "jax" if coordinator_address else cluster_from_env(os.environ)
    if kind is None and _gcloud_tpu_vm_hosts() > 1:
        kind = "tpu"
    if kind is None:
        return False
    args: dict[str, Any] = {"cluster_detection_method": "mpi4py"} if kind == "mpi4py" else {}
    if kind == "jax":
        env = os.environ
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
        check(num_processes is not None and num_processes >= 1, "num_processes", num_processes,
              "must be >= 1 when a coordinator address is given (flag or JAX_NUM_PROCESSES)")
        check(process_id is not None and 0 <= process_id < num_processes, "process_id", process_id,
              f"must be in [0, {num_processes}) (flag or JAX_PROCESS_ID)")
        args = {"coordinator_address": coordinator_address or env["JAX_COORDINATOR_ADDRESS"],
                "num_processes": num_processes, "process_id": process_id}
    # Only the CPU backend reads this; without it CPU devices of different processes cannot
    # run collectives. Set unconditionally because the backend must not be queried yet.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    return True


def describe(mesh: Mesh) -> str:
    """One line for the logs, e.g. `process 0/2: 4 local of 8 cpu devices, mesh data=8 fsdp=1 context=1
    tensor=1`."""
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    return (f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} "
            f"local of {jax.device_count()} {jax.devices()[0].platform} devices, mesh {axes}")


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (a collective: all processes must call it)."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [row[:n].tobytes() for row, n in zip(rows, sizes)]


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}


def check_same_on_all_hosts(name: str, value: Mapping[str, Any]) -> None:
    """Check that every process holds an equal `value` (e.g. `config.to_dict()`, named "config").

    The processes exchange the sha256 of `value` as sorted-key JSON; only when the digests differ
    do they exchange the JSON itself, to name the first key that differs. A no-op for a single
    process; otherwise a collective that every process must call (before anything compiles).

    Raises:
      UserError (on every process): one line, e.g. `config.optim.lr=0.001: process 1 has 0.002;
        every host must run the same config (same file, overrides and code)`.
    """
    if jax.process_count() == 1:
        return
    text = json.dumps(value, sort_keys=True, default=repr)
    digests = _allgather_bytes(hashlib.sha256(text.encode()).digest())
    me = jax.process_index()
    if all(d == digests[me] for d in digests):
        return
    other = next(i for i, d in enumerate(digests) if d != digests[me])
    texts = _allgather_bytes(text.encode())
    mine, theirs = (_flatten(json.loads(texts[i]), name) for i in (me, other))
    unset = "<unset>"
    key = min(k for k in mine.keys() | theirs.keys() if mine.get(k, unset) != theirs.get(k, unset))
    fail(key, mine.get(key, unset), f"process {other} has {theirs.get(key, unset)!r}; every host "
         f"must run the same {name} (same file, overrides and code)")
