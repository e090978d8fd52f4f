"""Mesh construction, batch placement and their input errors (8 forced CPU devices)."""

import os

import jax
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib


def test_fill_axis_from_device_count():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 4, "tensor": 1})  # a config without `context`: 1
    assert m.axis_names == ("data", "fsdp", "context", "tensor")
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


def test_context_axis_is_parsed_and_filled():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "context": 2, "tensor": 2, "context_parallel": "ulysses"})
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "context": 2, "tensor": 2}
    # tensor innermost, context next: devices 0, 1 differ in tensor, devices 0, 2 in context
    assert [d.id for d in m.devices[0, 0, :, :].flat] == [0, 1, 2, 3]
    assert mesh_lib.mesh_shape({"data": 1, "fsdp": 1, "context": -1, "tensor": 2}, 8) == (1, 1, 4, 2)
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1, 1)
    assert mesh_lib.context_parallel({"data": 1}) == "ring"  # missing key: the default


def test_configs_mesh_helper_has_context():
    from configs import common

    c = common.mesh()
    assert (c.context, c.context_parallel) == (1, "ring")
    assert mesh_lib.mesh_shape(common.mesh(context=4), 8) == (2, 1, 4, 1)


@pytest.mark.parametrize("value", ["zigzag", "Ring", None])
def test_bad_context_parallel_is_user_error(value):
    cfg = {"data": -1, "fsdp": 1, "context": 2, "tensor": 1, "context_parallel": value}
    with pytest.raises(UserError, match=r"^mesh.context_parallel=.*: must be one of \('ring', 'ulysses'\)$"):
        mesh_lib.make_mesh(cfg)


def test_one_device_mesh():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert m.devices.size == 1


@pytest.mark.parametrize("cfg, field", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "mesh="),       # 4 != 8 devices
    ({"data": -1, "fsdp": 3, "tensor": 1}, "mesh.data="),  # 3 does not divide 8
    ({"data": -1, "fsdp": -1, "tensor": 1}, "mesh="),      # two fills
    ({"data": 0, "fsdp": 8, "tensor": 1}, "mesh.data="),
    ({"data": 2, "fsdp": 1, "context": 2, "tensor": 1}, "mesh="),  # 4 != 8 devices
    ({"data": -1, "fsdp": 1, "context": 0, "tensor": 1}, "mesh.context="),
    ({"data": -1, "fsdp": 1, "context": -1, "tensor": 1}, "mesh="),  # two fills
])
def test_bad_mesh_is_user_error(cfg, field):
    with pytest.raises(UserError, match=field):
        mesh_lib.make_mesh(cfg)


def test_shard_batch_splits_dim0_over_data_and_fsdp():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    y = np.arange(8, dtype=np.int32)
    out = mesh_lib.shard_batch({"x": x, "y": y}, m)
    np.testing.assert_array_equal(np.asarray(out["x"]), x)
    np.testing.assert_array_equal(np.asarray(out["y"]), y)
    # 4 batch shards of 2 rows each, replicated over the tensor axis.
    shards = out["x"].addressable_shards
    assert {s.data.shape for s in shards} == {(2, 3)}
    assert len({s.index[0].start for s in shards}) == 4


def test_indivisible_batch_is_user_error():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    with pytest.raises(UserError, match=r"batch\['x'\].shape\[0\]=6: must be divisible by the data-parallel size"):
        mesh_lib.shard_batch({"x": np.zeros((6, 2))}, m)
    with pytest.raises(UserError, match="data.batch_size=12"):
        mesh_lib.check_global_batch(12, m)


LAUNCHER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                 "OMPI_", "TPU_", "MEGASCALE_")


def single_process_env(monkeypatch):
    """Drop every variable `cluster_from_env` reads (the tests may themselves run under SLURM)."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(key)


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}
OMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
ORTE = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "jax"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),                            # srun -n 1
    ({**SLURM, "SLURM_NTASKS": "2"}, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),  # 1-task step, 4-task job
    ({"SLURM_NTASKS": "2"}, None),                                     # no task id: not a task
    ({**SLURM, "SLURM_NTASKS": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "jax"),  # explicit wins
    ({**OMPI, **ORTE, "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({**OMPI, **ORTE, "OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({**OMPI, "OMPI_COMM_WORLD_SIZE": "2"}, "mpi4py"),                 # Open MPI 5 (no ORTE)
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0"}, None),                       # one-host TPU slice
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1", "TPU_WORKER_ID": "1"}, "tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0", "MEGASCALE_NUM_SLICES": "2"}, "tpu"),  # multislice
])
def test_cluster_from_env(env, kind):
    assert mesh_lib.cluster_from_env(env) == kind


@pytest.mark.parametrize("name, env, count, host", [
    ("SlurmCluster", {**SLURM, "SLURM_NTASKS": "2"}, 2, "node001"),
    ("OmpiCluster", {**OMPI, **ORTE, "OMPI_COMM_WORLD_SIZE": "3"}, 3, "10.96.0.1"),
])
def test_jax_detects_the_clusters_we_detect(monkeypatch, name, env, count, host):
    """What `jax.distributed.initialize()` will find, with no arguments, in the environments that
    `cluster_from_env` calls multi-process."""
    from jax._src import clusters

    single_process_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cluster = getattr(clusters, name)
    assert cluster.is_env_present()
    assert cluster.get_process_count() == count and cluster.get_process_id() == 1
    assert cluster.get_coordinator_address(None, None).rsplit(":", 1)[0] == host


def test_initialize_distributed_passes_the_detected_cluster_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the backend is already up
    single_process_env(monkeypatch)
    assert mesh_lib.initialize_distributed() is False and calls == []  # single process: no-op

    monkeypatch.setattr(mesh_lib, "_gcloud_tpu_vm_hosts", lambda: 4)  # a TPU VM slice of 4 hosts
    assert mesh_lib.initialize_distributed() is True and calls.pop() == {}
    monkeypatch.setattr(mesh_lib, "_gcloud_tpu_vm_hosts", lambda: 1)

    for key, value in {**SLURM, "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    assert mesh_lib.initialize_distributed() is True and calls.pop() == {}  # JAX reads SLURM_*
    single_process_env(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert mesh_lib.initialize_distributed() is True
    assert calls.pop() == {"cluster_detection_method": "mpi4py"}
    single_process_env(monkeypatch)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert mesh_lib.initialize_distributed() is True
    assert calls.pop() == {"coordinator_address": "localhost:1234", "num_processes": 2,
                           "process_id": 1}


def test_initialize_distributed_needs_process_id(monkeypatch):
    single_process_env(monkeypatch)
    assert mesh_lib.initialize_distributed() is False  # single process: no-op
    with pytest.raises(UserError, match="process_id=5"):
        mesh_lib.initialize_distributed("localhost:1234", num_processes=2, process_id=5)


def test_describe_and_config_check_on_one_process():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert mesh_lib.describe(m) == ("process 0/1: 8 local of 8 cpu devices, "
                                    "mesh data=4 fsdp=2 context=1 tensor=1")
    mesh_lib.check_same_on_all_hosts("config", {"seed": 0})  # one process: nothing to compare
