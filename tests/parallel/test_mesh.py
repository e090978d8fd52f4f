"""Mesh construction, batch placement and their input errors (8 forced CPU devices)."""

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


def test_initialize_distributed_needs_process_id(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert mesh_lib.initialize_distributed() is False  # single process: no-op
    with pytest.raises(UserError, match="process_id=5"):
        mesh_lib.initialize_distributed("localhost:1234", num_processes=2, process_id=5)
