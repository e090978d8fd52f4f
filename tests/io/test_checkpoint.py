"""Orbax checkpoints: round trip with the grain iterator, restore onto other meshes, refusal of
non-finite states and of changed model configs, SIGTERM flag (8 forced CPU devices)."""

import json
import os
import re
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


def corrupt(workdir, how: str) -> int:
    """Break the newest checkpoint (step 4) as issue 21 found them; returns the broken step."""
    state_dir = workdir / "checkpoints" / "4" / "state"
    if how == "stray":
        (workdir / "checkpoints" / "999").mkdir()
        return 999
    paths = [state_dir / "_METADATA"] if how == "metadata" else [
        p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]  # the data files
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)
    return 4


@pytest.mark.parametrize("how", ["data", "metadata", "stray"])
def test_unreadable_checkpoint_is_named_or_skipped(tmp_path, capsys, how):
    """A truncated data file or `_METADATA`, or a stray `checkpoints/999/`: one line naming the
    step without fallback; with fallback the newest intact step, said so on stderr."""
    _, state, _ = setup({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    config = dict(CKPT, max_to_keep=0, async_save=False)
    manager = checkpoint.make_manager(str(tmp_path), config)
    for step in (2, 4):
        checkpoint.save(manager, step, state.replace(step=state.step + step), config={"seed": step}, force=True)
    manager.wait_until_finished()
    broken = corrupt(tmp_path, how)
    expected = 4 if how == "stray" else 2
    manager = checkpoint.make_manager(str(tmp_path), config)
    abstract, _ = abstract_on({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    def read(s):
        return checkpoint.restore(manager, abstract, step=s)

    with pytest.raises(UserError, match=rf"^checkpoint='{tmp_path}/checkpoints/{broken}': is unreadable \("):
        checkpoint.newest_intact(manager, read, fallback=False)
    capsys.readouterr()
    step, restored, bad = checkpoint.newest_intact(manager, read, fallback=True)
    assert (step, int(restored.step), bad) == (expected, int(state.step) + expected, [broken])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(rf"genjax: note: checkpoint step {broken} in {tmp_path}/"
                                          rf"checkpoints is unreadable \(.+\); resuming from step {expected}", err[0]), err
    # restore_ema (genjax sample, frozen models) falls back the same way.
    ema = checkpoint.restore_ema(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, ema, jax.tree.map(np.asarray, state.ema_params))
    assert f"step {broken} in {tmp_path}/checkpoints is unreadable" in capsys.readouterr().err
    with pytest.raises(UserError, match=rf"^checkpoint='.*/{broken}': is unreadable"):
        checkpoint.restore_ema(str(tmp_path), fallback=False)
    checkpoint.move_broken(manager, bad)
    assert manager.all_steps() == [2, 4][: 2 if how == "stray" else 1]
    assert (tmp_path / "checkpoints.broken" / str(broken)).is_dir()


SAVED = {"seed": 0, "num_steps": 20, "log_every_steps": 1, "model": {"name": "dit"},
         "data": {"batch_size": 16}, "optim": {"lr": 1e-3, "max_nonfinite_steps": 10},
         "diffusion": {"num_timesteps": 1000}, "mesh": {"data": 1}, "ckpt": {"max_to_keep": 2},
         "eval": {"sample_every_steps": 0}}


def changed(path: str, value):
    config = json.loads(json.dumps(SAVED))
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    ("data.batch_size", 8, r"^data.batch_size=8: differs from the checkpoint's 16; resuming with a changed data"),
    ("optim.lr", 0.01, r"^optim.lr=0.01: differs from the checkpoint's 0.001; resuming with a changed optim"),
    ("diffusion.num_timesteps", 10, r"^diffusion.num_timesteps=10: differs"),
    ("seed", 1, r"^seed=1: differs from the checkpoint's 0"),
    ("num_steps", 15, r"^num_steps=15: is below the checkpoint's step 20; raise num_steps"),
])
def test_resume_refuses_a_changed_trajectory(path, value, message):
    with pytest.raises(UserError, match=message):
        checkpoint.check_resume(SAVED, changed(path, value), step=20)


@pytest.mark.parametrize("path, value", [
    ("num_steps", 40), ("log_every_steps", 5), ("mesh.data", 8), ("ckpt.max_to_keep", 0),
    ("eval.sample_every_steps", 10), ("optim.max_nonfinite_steps", 3)])
def test_resume_allows_fields_that_keep_the_trajectory(path, value):
    checkpoint.check_resume(SAVED, changed(path, value), step=20)
