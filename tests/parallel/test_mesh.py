"""Mesh construction, batch placement and their input errors (8 forced CPU devices)."""

import jax
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib


def test_fill_axis_from_device_count():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 4, "tensor": 1})
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


def test_one_device_mesh():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert m.devices.size == 1


@pytest.mark.parametrize("cfg, field", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "mesh="),       # 4 != 8 devices
    ({"data": -1, "fsdp": 3, "tensor": 1}, "mesh.data="),  # 3 does not divide 8
    ({"data": -1, "fsdp": -1, "tensor": 1}, "mesh="),      # two fills
    ({"data": 0, "fsdp": 8, "tensor": 1}, "mesh.data="),
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
