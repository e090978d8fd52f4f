"""End-to-end trainer tests on the smoke DiT-MNIST config (8 forced CPU devices)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from genjax.config import load_config
from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib
from genjax import tasks
from genjax.data import recipes
from genjax.io import checkpoint
from genjax.train import trainer
from genjax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "dit_mnist.py")
ONE = ["--config.mesh.data=1"]


def smoke(*overrides):
    return load_config(f"{CONFIG}:smoke=True", ["--config.num_steps=20", *overrides])


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """20 steps on 1 device, checkpoints every 10, a sample grid at step 20."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    trainer.main(smoke(*ONE, "--config.eval.sample_every_steps=20"), workdir, devices=jax.devices()[:1])
    return workdir


def test_reference_run_writes_everything(reference):
    with open(os.path.join(reference, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "grad_norm", "param_norm", "lr", "examples_per_sec", "nonfinite_steps", "mfu"):
        assert key in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["mfu"] is None  # CPU: peak FLOP/s unknown
    assert json.load(open(os.path.join(reference, "config.json")))["model"]["name"] == "dit"
    assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == ["10", "20"]
    assert not os.path.exists(os.path.join(reference, ".lock"))  # released at exit
    assert os.listdir(os.path.join(reference, "tb"))
    grid = Image.open(os.path.join(reference, "samples", "step_000020.png"))
    assert grid.size[0] > 2 * 28 and grid.mode == "L"


def test_activation_constraints_shard_the_tokens_in_the_train_step(tmp_path):
    """The models' `nn.with_logical_constraint(x, (batch, length, None))` takes effect in the
    trainer's step: the lowered HLO constrains the DiT's tokens after the patch embedding and after
    every block to batch over data x fsdp and tokens over context (the rules of parallel/axes.py),
    on a 2 x 4 mesh (context 1: the size-1 axis is named in the constraint, splits nothing)."""
    config = smoke("--config.mesh.data=2", "--config.mesh.fsdp=4")
    mesh = mesh_lib.make_mesh(config.mesh)
    task = tasks.build(config, mesh=mesh)
    tx, _ = state_lib.make_optimizer(config.optim, config.num_steps)
    state, shardings = state_lib.create_train_state(task.init_params, tx, seed=0, mesh=mesh)
    batch = mesh_lib.shard_batch(next(task.make_data(str(tmp_path))), mesh)
    step = trainer.make_train_step(task.loss_fn, tx, mesh=mesh, state_shardings=shardings, ema_decay=0.9,
                                   ema_warmup=False)
    hlo = step.lower(state, batch, jax.random.key(0)).as_text()
    tokens = (config.data.batch_size, (config.data.image_size // config.model.patch_size) ** 2,
              config.model.hidden_size)
    constrained = [line for line in hlo.splitlines() if "sharding_constraint" in line
                   and f"tensor<{'x'.join(map(str, tokens))}xf32>" in line]
    assert len(constrained) >= 1 + config.model.depth, constrained
    assert all('[{"data", "fsdp"}, {"context"}, {}]' in line for line in constrained), constrained


@pytest.mark.slow  # ~15 s of compiling on a quiet 2-core machine, minutes under load
def test_eight_devices_match_one_device_and_shard_params(reference, tmp_path):
    config = smoke("--config.mesh.data=2", "--config.mesh.fsdp=4")
    trainer.main(config, str(tmp_path))
    one, eight = losses(reference), losses(str(tmp_path))
    np.testing.assert_allclose([eight[s] for s in range(1, 21)], [one[s] for s in range(1, 21)], rtol=1e-5)
    # Restored with main's shardings: an MLP kernel is split 4 ways over fsdp on its embed dim.
    init_params = tasks.build(config).init_params
    tx, _ = state_lib.make_optimizer(config.optim, config.num_steps)
    mesh = mesh_lib.make_mesh(config.mesh)
    abstract, _ = state_lib.abstract_train_state(init_params, tx, seed=0, mesh=mesh)
    state = checkpoint.restore(checkpoint.make_manager(str(tmp_path), config.ckpt), abstract)
    kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # (embed, mlp) = (32, 128)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 128)}
    assert len({s.index[0].start for s in kernel.addressable_shards}) == 4


@pytest.mark.slow  # heavy on 2 CPU cores; run by `make test-all`
def test_resume_equals_uninterrupted(reference, tmp_path):
    workdir = str(tmp_path)
    trainer.main(smoke(*ONE, "--config.num_steps=13"), workdir, devices=jax.devices()[:1])
    # Step 13 was saved as the final checkpoint; drop it to resume from 10 like a killed run,
    # with metrics.jsonl still holding steps 11-13 that the resumed run must replace.
    import shutil
    shutil.rmtree(os.path.join(workdir, "checkpoints", "13"))
    trainer.main(smoke(*ONE), workdir, devices=jax.devices()[:1])
    assert losses(workdir) == losses(reference)  # bit for bit, steps 1-20


def test_changed_model_config_is_refused(reference, tmp_path):
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    with pytest.raises(UserError, match=r"^model.hidden_size=48: differs from the checkpoint's 32"):
        trainer.main(smoke(*ONE, "--config.model.hidden_size=48"), workdir, devices=jax.devices()[:1])


def test_a_locked_workdir_is_refused_at_once(tmp_path):
    """Issue 21: two runs into one workdir both trained, interleaving metrics.jsonl. Here the test
    process holds the lock, as a first `genjax train` would."""
    from genjax.io import lock
    owner = lock.acquire(str(tmp_path))
    try:
        start = time.perf_counter()
        with pytest.raises(UserError, match=rf"^workdir='{tmp_path}': in use by pid {os.getpid()} "
                           rf"on host .+ since .+; wait for that run to end"):
            trainer.main(smoke(*ONE), str(tmp_path), devices=jax.devices()[:1])
        assert time.perf_counter() - start < 5
        assert os.listdir(tmp_path) == [".lock"]
    finally:
        lock.release(str(tmp_path), owner)


@pytest.mark.parametrize("override, message", [
    ("--config.data.batch_size=8", r"^data.batch_size=8: differs from the checkpoint's 16"),
    ("--config.optim.lr=0.01", r"^optim.lr=0.01: differs from the checkpoint's 0.001"),
    ("--config.num_steps=15", r"^num_steps=15: is below the checkpoint's step 20"),
])
def test_resume_that_changes_the_run_is_refused(reference, tmp_path, override, message):
    """Issue 21: a changed batch size was silently accepted; fewer steps rewrote config.json."""
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(UserError, match=message):
        trainer.main(smoke(*ONE, override), workdir, devices=jax.devices()[:1])
    assert open(os.path.join(workdir, "config.json")).read() == before
    assert not os.path.exists(os.path.join(workdir, ".lock"))


def test_broken_checkpoints_fall_back_to_the_newest_intact_step(reference, tmp_path, capsys):
    """Issue 21: a stray checkpoints/999/ and a truncated _METADATA gave orbax tracebacks; the
    intact step 10 was never tried."""
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    os.mkdir(os.path.join(workdir, "checkpoints", "999"))
    metadata = os.path.join(workdir, "checkpoints", "20", "state", "_METADATA")
    os.truncate(metadata, os.path.getsize(metadata) // 2)
    with pytest.raises(UserError, match=rf"^checkpoint='{workdir}/checkpoints/999': is unreadable "
                       r"\(KeyError: .*\); set --config.ckpt.fallback=True"):
        trainer.main(smoke(*ONE, "--config.ckpt.fallback=False"), workdir, devices=jax.devices()[:1])
    capsys.readouterr()
    trainer.main(smoke(*ONE, "--config.num_steps=10"), workdir, devices=jax.devices()[:1])
    err = capsys.readouterr().err
    assert f"genjax: note: checkpoint step 999, 20 in {workdir}/checkpoints is unreadable" in err
    assert "resuming from step 10" in err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints.broken"))) == ["20", "999"]  # kept


def test_an_interrupted_run_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, capsys,
                                                                          monkeypatch):
    """Issue 21: a SIGKILL before the first checkpoint committed restarted silently."""
    os.makedirs(tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1700000000")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer.tasks, "build", stop)  # no need to train: the note comes first
    with pytest.raises(Stop):
        trainer.main(smoke(*ONE), str(tmp_path), devices=jax.devices()[:1])
    assert (f"genjax: note: no complete checkpoint in {tmp_path}/checkpoints, starting from step 0"
            in capsys.readouterr().err)


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.batch_size=12"], r"^data.batch_size=12: must be divisible by the data-parallel size data\*fsdp=8"),
    (["--config.mesh.data=2"], r"^mesh=\{'data': 2, 'fsdp': 1, 'context': 1, 'tensor': 1\}: data\*fsdp\*context\*tensor must equal the device count 8"),
    (["--config.ckpt.max_to_keep=-1"], r"^ckpt.max_to_keep=-1: must be >= 0"),
    (["--config.model.name=unet3d"], r"^model.name='unet3d': must be one of"),
    (["--config.optim.grad_accum_steps=3"], r"^optim.grad_accum_steps=3: must divide data.batch_size=16"),
    (["--config.optim.ema_decay=2"], r"^optim.ema_decay=2.0: must be in \[0, 1\]"),
    (["--config.model.depth=-1"], r"^model.depth=-1: must be >= 1"),
    (["--config.optim.b1=1.0"], r"^optim.b1=1.0: must be in \[0, 1\)"),
])
def test_bad_input_fails_before_compiling(tmp_path, overrides, message):
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        trainer.main(smoke(*overrides), str(tmp_path))
    assert time.perf_counter() - start < 5
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


@pytest.mark.parametrize("section, key, allowed", [
    ("model", "hiden_size", "hidden_size"), ("data", "batch_sise", "batch_size"),
    ("optim", "ema_dacay", "ema_decay"), ("diffusion", "num_timestep", "num_timesteps"),
    ("ckpt", "fallbak", "fallback"), ("eval", "num_sample", "num_samples"), ("task", "vea", "vae"),
    ("mesh", "fdsp", "fsdp"), ("", "num_step", "num_steps"),
])
def test_a_misspelt_key_in_any_section_fails_before_compiling(tmp_path, section, key, allowed):
    # A key written in the config file itself (overrides are checked by config_flags already).
    config = smoke()
    config.unlock()
    if section == "task":
        config.task = {}
    (config[section] if section else config)[key] = 1
    with pytest.raises(UserError, match=rf"^{section + '.' if section else ''}{key}\b.*{allowed}") as e:
        trainer.main(config, str(tmp_path))
    assert "\n" not in str(e.value)
    for name in ("checkpoints", "config.json", "metrics.jsonl"):  # nothing written
        assert not os.path.exists(tmp_path / name)


# Config arguments to check beyond the defaults (a config that needs arguments, or that switches
# sections on with them).
CONFIG_ARGS = {
    "video_folder.py": ["stage=vae,path=/clips", "stage=dit,path=/clips,vae=/vae,packed=True"],
    "video_dit_moving_mnist.py": [None, "packed=True,objective=flow", "smoke=True,packed=True"],
    "dit_mnist.py": [None, "objective=flow", "objective=v"],
    "unet_mnist.py": [None, "objective=flow"],
    "mae_mnist.py": [None, "cpu=True", "video=True", "video=True,cpu=True", "video=True,smoke=True"],
}


def test_every_shipped_config_passes_the_key_checks():
    import glob
    import importlib.util

    from genjax.io import checkpoint as ckpt_lib

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        spec = importlib.util.spec_from_file_location("_cfg", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            continue
        for arg in CONFIG_ARGS.get(os.path.basename(path), [None]):
            c = module.get_config(arg)
            for sub in [c] + [c[k] for k in ("vae", "text", "dit") if k in c]:
                if "name" not in sub.get("model", {}):
                    continue  # not a `genjax train` config (e.g. the CLIP experiment's own trainer)
                tasks.check_keys(sub)
                state_lib.validate_optim(sub.optim, sub.num_steps)
                ckpt_lib.validate_ckpt(sub.ckpt)
                mesh_lib.validate_mesh(sub.mesh)


def test_consecutive_nonfinite_steps_stop_training(tmp_path, monkeypatch):
    def nan_images(example):
        return {"image": np.full_like(example["image"], np.nan), "label": np.int32(example["label"])}
    monkeypatch.setattr(recipes, "image_inputs", nan_images)
    config = smoke(*ONE, "--config.optim.max_nonfinite_steps=3", "--config.ckpt.save_interval_steps=1")
    with pytest.raises(trainer.NonFiniteError, match="3 consecutive steps with NaN/Inf gradients"):
        trainer.main(config, str(tmp_path), devices=jax.devices()[:1])
    def not_json(constant):  # bare NaN / Infinity are not JSON (issue 21)
        raise AssertionError(f"metrics.jsonl holds {constant}")

    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line, parse_constant=not_json) for line in f]
    assert [r["nonfinite_steps"] for r in records] == [1, 2]  # step 3's record is the stop
    assert all(r["loss"] is None and "loss" in r["nonfinite"] for r in records)
    manager = checkpoint.make_manager(str(tmp_path), config.ckpt)
    assert manager.all_steps()  # checkpoints were written, and every one is the finite initial state
    init_params = tasks.build(config).init_params
    tx, _ = state_lib.make_optimizer(config.optim, config.num_steps)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    abstract, _ = state_lib.abstract_train_state(init_params, tx, seed=0, mesh=mesh)
    for step in manager.all_steps():
        restored = checkpoint.restore(manager, abstract, step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
        assert int(restored.nonfinite_count) == step


def _train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "genjax.cli", "train", "--config", f"{CONFIG}:smoke=True",
            "--workdir", workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4",
            "--config.num_steps=70", *overrides]


def _wait_for_step(proc, workdir, step, timeout=600):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if os.path.exists(path) and max(losses(workdir), default=0) >= step:
                return
        except json.JSONDecodeError:  # a line being written
            pass
        time.sleep(0.2)
    raise AssertionError(f"run did not reach step {step} (exit {proc.poll()})")


@pytest.mark.slow  # four `genjax train` processes
def test_kill9_and_sigterm_then_resume_equals_uninterrupted(tmp_path):
    rnd = random.Random()
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    subprocess.run(_train_cmd(full), check=True, cwd=ROOT, capture_output=True)

    proc = subprocess.Popen(_train_cmd(cut), cwd=ROOT, stderr=subprocess.DEVNULL)
    first = os.path.join(cut, "checkpoints", "10")  # the finalised name appears by an atomic rename
    deadline = time.time() + 600
    while not os.path.isdir(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    _wait_for_step(proc, cut, rnd.randint(11, 25))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manager = checkpoint.make_manager(cut, {"save_interval_steps": 10, "max_to_keep": 2, "async_save": False})
    assert manager.latest_step() in (10, 20)

    proc = subprocess.Popen(_train_cmd(cut), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, cut, 35)
    proc.send_signal(signal.SIGTERM)  # preemption: save at the next step, exit cleanly
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "took over the stale lock" in err  # left by the SIGKILLed run
    assert not os.path.exists(os.path.join(cut, ".lock"))  # released after the preemption save
    preempted_at = max(losses(cut))
    assert checkpoint.make_manager(cut, {"save_interval_steps": 10, "max_to_keep": 2,
                                         "async_save": False}).latest_step() == preempted_at

    subprocess.run(_train_cmd(cut), check=True, cwd=ROOT, capture_output=True)
    assert not [n for n in os.listdir(os.path.join(cut, "checkpoints")) if "tmp" in n]
    assert losses(cut) == losses(full)  # bit for bit, steps 1-70
    assert sorted(losses(cut)) == list(range(1, 71))


_MULTIHOST = r'''
import json, sys
import numpy as np
from genjax.parallel import mesh as mesh_lib
num_processes, process_id, port = map(int, sys.argv[1:4])
if num_processes > 1:
    mesh_lib.initialize_distributed(f"localhost:{port}", num_processes, process_id)
import jax
from genjax.config import load_config
from genjax import tasks
from genjax.train import state as state_lib, trainer
config = load_config(sys.argv[4] + ":smoke=True", ["--config.mesh.data=2", "--config.mesh.fsdp=4"])
mesh = mesh_lib.make_mesh(config.mesh)
task = tasks.build(config)
init_params, loss_fn = task.init_params, task.loss_fn
tx, schedule = state_lib.make_optimizer(config.optim, 10)
state, shardings = state_lib.create_train_state(init_params, tx, seed=0, mesh=mesh)
step = trainer.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings, ema_decay=0.99,
                               ema_warmup=False)
out = []
for i in range(5):
    r = np.random.default_rng(i)  # the same global batch of 16 everywhere; each process takes its rows
    batch = {"image": r.uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32),
             "label": r.integers(0, 10, 16).astype(np.int32)}
    rows = slice(process_id * 16 // num_processes, (process_id + 1) * 16 // num_processes)
    local = {k: v[rows] for k, v in batch.items()}
    state, metrics = step(state, mesh_lib.shard_batch(local, mesh), jax.random.fold_in(state.rng, i))
    out.append(float(metrics["loss"]))
print("LOSSES", json.dumps(out))
'''


@pytest.mark.slow  # three processes, each compiling the smoke DiT step
def test_two_processes_on_loopback_match_one_process():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]

    def launch(n, i, devices):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        return subprocess.Popen([sys.executable, "-c", _MULTIHOST, str(n), str(i), str(port), CONFIG],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(proc):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.split("LOSSES", 1)[1])

    pair = [launch(2, i, 4) for i in range(2)]
    two = [result(p) for p in pair]
    one = result(launch(1, 0, 8))
    assert two[0] == two[1]
    np.testing.assert_allclose(two[0], one, rtol=1e-5)
