"""Orbax checkpoints: round trip with the grain iterator, restore onto other meshes, refusal of
non-finite states and of changed model configs, SIGTERM flag (8 forced CPU devices)."""

import os
import signal

import grain
import jax
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib
from genjax.io import checkpoint
from genjax.train import state as state_lib
from tests.train.test_state import OPTIM, init_params, run, setup

CKPT = dict(save_interval_steps=2, max_to_keep=2, async_save=True)


def abstract_on(mesh_config, devices=None):
    mesh = mesh_lib.make_mesh(mesh_config, devices)
    tx, _ = state_lib.make_optimizer(OPTIM, total_steps=100)
    return state_lib.abstract_train_state(init_params, tx, seed=0, mesh=mesh)


def test_save_on_8_devices_restore_on_4_and_1(tmp_path):
    mesh, state, step = setup({"data": 2, "fsdp": 4, "tensor": 1})
    state, _ = run(mesh, state, step, 2)
    it = iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())
    next(it), next(it)
    manager = checkpoint.make_manager(str(tmp_path), CKPT)
    assert checkpoint.save(manager, 2, state, data_iterator=it, config={"model": {"name": "mlp"}})
    manager.wait_until_finished()
    expected_next = next(it)
    saved = jax.tree.map(np.asarray, state)
    assert manager.all_steps() == [2]
    assert {"config", "data", "state"} <= set(os.listdir(tmp_path / "checkpoints" / "2"))

    for mesh_config, devices in [({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4]),
                                 ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])]:
        abstract, _ = abstract_on(mesh_config, devices)
        fresh = iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())
        restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path), CKPT), abstract,
                                      data_iterator=fresh)
        jax.tree.map(np.testing.assert_array_equal, restored, saved)
        kernel = restored.params["Dense_0"]["kernel"]
        assert {d.id for d in kernel.sharding.device_set} == {d.id for d in devices}
        np.testing.assert_array_equal(next(fresh), expected_next)
    assert checkpoint.saved_config(manager) == {"model": {"name": "mlp"}}


def test_interval_and_max_to_keep(tmp_path):
    mesh, state, step = setup({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    manager = checkpoint.make_manager(str(tmp_path), CKPT)
    saved = []
    for i in range(7):
        state, _ = step(state, mesh_lib.shard_batch({"x": np.ones((2, 8), np.float32),
                                                     "y": np.zeros((2, 8), np.float32)}, mesh),
                        state.rng)
        saved.append(checkpoint.save(manager, i + 1, state))
    manager.wait_until_finished()
    assert saved == [False, True, False, True, False, True, False]
    assert manager.all_steps() == [4, 6]  # max_to_keep=2


def test_nonfinite_state_is_never_written(tmp_path):
    mesh, state, _ = setup({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    bad = state.replace(step=state.step + 2, ema_params=jax.tree.map(lambda x: x * np.nan, state.ema_params))
    manager = checkpoint.make_manager(str(tmp_path), CKPT)
    with pytest.raises(FloatingPointError, match="step 2: the train state is not finite"):
        checkpoint.save(manager, 2, bad)
    manager.wait_until_finished()
    assert manager.all_steps() == []


def test_changed_model_config_names_the_field():
    saved = {"model": {"name": "dit", "hidden_size": 64, "patch_size": [2, 2]}, "optim": {"lr": 1.0}}
    same = {"model": {"name": "dit", "hidden_size": 64, "patch_size": (2, 2)}, "optim": {"lr": 2.0}}
    checkpoint.check_same_section(saved, same, "model")
    changed = {"model": {"name": "dit", "hidden_size": 96, "patch_size": (2, 2)}}
    with pytest.raises(UserError, match=r"^model.hidden_size=96: differs from the checkpoint's 64"):
        checkpoint.check_same_section(saved, changed, "model")


@pytest.mark.parametrize("field, value", [("max_to_keep", -1), ("save_interval_steps", 0)])
def test_bad_ckpt_config(tmp_path, field, value):
    with pytest.raises(UserError, match=f"ckpt.{field}={value}"):
        checkpoint.make_manager(str(tmp_path), dict(CKPT, **{field: value}))


def test_sigterm_sets_the_preemption_flag():
    p = checkpoint.Preemption()
    try:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested()
    finally:
        p.restore_handler()
