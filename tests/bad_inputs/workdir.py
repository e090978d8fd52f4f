"""Bad-input catalogue rows: workdir (issue 21): the workdir lock, resume checks, broken
checkpoints (defects 3 and 6).

Checkpoints here hold a tiny stand-in state (a 2-vector of EMA params) and the smoke DiT-MNIST
config: every row fails before a model is built, so none needs a trained run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np

from tests.bad_inputs import Case

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT / 'configs' / 'dit_mnist.py'}:smoke=True"


def _smoke_config() -> dict:
    from genjax.config import load_config
    return load_config(CONFIG, []).to_dict()


def _workdir(path: Path, steps=(10,), config: dict | None = None) -> Path:
    """A workdir with checkpoints `steps` of a stand-in state, saved with `config` (default the
    smoke config), and its config.json."""
    import orbax.checkpoint as ocp

    from genjax.io import checkpoint

    config = config or _smoke_config()
    manager = checkpoint.make_manager(str(path), {"save_interval_steps": 1, "max_to_keep": 0,
                                                  "async_save": False})
    state = {"ema_params": {"w": np.zeros(2, np.float32)}}
    for step in steps:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   config=ocp.args.JsonSave(config)), force=True)
    manager.wait_until_finished()
    manager.close()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _train(workdir: Path, *overrides: str) -> list[str]:
    return ["train", "--config", CONFIG, "--workdir", str(workdir), *overrides]


def _sample(workdir: Path, out: Path) -> list[str]:
    return ["sample", "--workdir", str(workdir), "--out", str(out), "--class-label", "1"]


def cases(workspace: Path) -> list[Case]:
    from genjax import tasks
    from genjax.io import checkpoint, lock

    host, pid = socket.gethostname(), os.getpid()

    def locked(name: str, content: str) -> Path:
        (workspace / name).mkdir()
        (workspace / name / ".lock").write_text(content)
        return workspace / name

    live = locked("live", json.dumps({"host": host, "pid": pid, "since": "2026-01-01T00:00:00"}))
    remote = locked("remote", json.dumps({"host": "node-7", "pid": 1, "since": "2026-01-01T00:00:00"}))
    empty_lock = locked("empty_lock", "")
    garbage_lock = locked("garbage_lock", '{"pid": "x"')
    (workspace / "a_file").write_text("not a folder")

    trained = _workdir(workspace / "trained", steps=(10, 20))
    stray = _workdir(workspace / "stray", steps=(10,))
    (stray / "checkpoints" / "999").mkdir()
    truncated = _workdir(workspace / "truncated", steps=(10, 20))
    metadata = truncated / "checkpoints" / "20" / "state" / "_METADATA"
    os.truncate(metadata, metadata.stat().st_size // 2)
    only_stray = _workdir(workspace / "only_stray", steps=())
    (only_stray / "checkpoints" / "999").mkdir()
    no_fallback = _smoke_config()
    no_fallback["ckpt"]["fallback"] = False
    strict = _workdir(workspace / "strict", steps=(10,), config=no_fallback)
    (strict / "checkpoints" / "999").mkdir()
    no_ckpt = workspace / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text(json.dumps(_smoke_config()))
    saved = _smoke_config()
    fewer = dict(saved, num_steps=15)
    out = workspace / "out.npz"

    return [
        # Defect 3: the workdir lock.
        Case("train: workdir locked by a live run", _train(live), 2,
             rf"^genjax train: error: workdir='.*live': in use by pid {pid} on host .+ since "
             r"2026-01-01T00:00:00; wait for that run to end"),
        Case("train: workdir locked on another host", _train(remote), 2,
             r"^genjax train: error: workdir='.*remote': in use by pid 1 on host node-7 since"),
        Case("train: empty lock file", _train(empty_lock), 2,
             r"^genjax train: error: workdir='.*empty_lock': holds an unreadable lock file .*\.lock"),
        Case("train: lock file of garbage", _train(garbage_lock), 2,
             r"^genjax train: error: workdir='.*garbage_lock': holds an unreadable lock file"),
        Case("train: workdir is a file", _train(workspace / "a_file"), 2,
             r"^genjax train: error: --workdir='.*a_file': is a file, not a folder"),
        Case("lock.acquire: a live owner", lambda: lock.acquire(str(live)), 2,
             rf"^workdir='.*live': in use by pid {pid}"),
        # Defect 3: resuming with a config that changes what is trained.
        Case("train: resume with another batch size", _train(trained, "--config.data.batch_size=8"), 2,
             r"^genjax train: error: data.batch_size=8: differs from the checkpoint's 16; resuming "
             r"with a changed data is not allowed"),
        Case("train: resume with another lr", _train(trained, "--config.optim.lr=0.5"), 2,
             r"^genjax train: error: optim.lr=0.5: differs from the checkpoint's 0.001"),
        Case("train: resume with another ema_decay", _train(trained, "--config.optim.ema_decay=0.5"), 2,
             r"^genjax train: error: optim.ema_decay=0.5: differs from the checkpoint's 0.99"),
        Case("train: resume with another seed", _train(trained, "--config.seed=3"), 2,
             r"^genjax train: error: seed=3: differs from the checkpoint's 0"),
        Case("train: resume with another diffusion", _train(trained, "--config.diffusion.num_timesteps=50"), 2,
             r"^genjax train: error: diffusion.num_timesteps=50: differs from the checkpoint's 1000"),
        Case("train: resume with another model", _train(trained, "--config.model.depth=3"), 2,
             r"^genjax train: error: model.depth=3: differs from the checkpoint's 2"),
        Case("check_resume: fewer steps than the checkpoint",
             lambda: checkpoint.check_resume(saved, fewer, 20), 2,
             r"^num_steps=15: is below the checkpoint's step 20; raise num_steps"),
        # Defect 6: broken checkpoints.
        Case("train: stray checkpoints/999 without fallback",
             _train(stray, "--config.ckpt.fallback=False"), 2,
             r"^genjax train: error: checkpoint='.*stray/checkpoints/999': is unreadable \(KeyError"),
        Case("train: truncated _METADATA without fallback",
             _train(truncated, "--config.ckpt.fallback=False"), 2,
             r"^genjax train: error: checkpoint='.*truncated/checkpoints/20': is unreadable "
             r"\(JSONDecodeError"),
        Case("train: no readable checkpoint at all", _train(only_stray), 2,
             r"^genjax train: error: checkpoint='.*only_stray/checkpoints': no checkpoint is "
             r"readable \(step 999: "),
        Case("train: ckpt.fallback not a bool", _train(trained, "--config.ckpt.fallback=2"), 2,
             r"^genjax train: error: .*--config.ckpt.fallback=2"),
        Case("sample: no readable checkpoint", _sample(only_stray, out), 2,
             r"^genjax sample: error: checkpoint='.*only_stray/checkpoints': no checkpoint is readable"),
        Case("sample: broken newest checkpoint, the run's ckpt.fallback=False", _sample(strict, out), 2,
             r"^genjax sample: error: checkpoint='.*strict/checkpoints/999': is unreadable"),
        Case("sample: workdir with config.json but no checkpoint", _sample(no_ckpt, out), 2,
             r"^genjax sample: error: --workdir='.*no_ckpt': holds no checkpoint"),
        Case("restore_ema: broken newest, fallback=False",
             lambda: checkpoint.restore_ema(str(stray), fallback=False), 2,
             r"^checkpoint='.*stray/checkpoints/999': is unreadable \(FileNotFoundError"),
        Case("tasks.restore: no readable checkpoint", lambda: tasks.restore(str(only_stray)), 2,
             r"^checkpoint='.*only_stray/checkpoints': no checkpoint is readable"),
    ]
