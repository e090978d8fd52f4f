"""`genjax demo --smoke`: the whole staged text-to-video job (video VAE -> CLIP text encoder ->
video DiT -> samples -> evaluation) with tiny models, run once per test session through
`genjax.cli.main` (~100 s CPU, most of it XLA compilation; tests/test_sample.py reuses it)."""

import json
import os
import time

import numpy as np
import pytest

from genjax import cli

# One smoke demo run per session (the `smoke_demo` fixture in conftest.py, one definition shared by
# test_demo.py and test_sample.py): keep both files on one xdist worker (`--dist loadgroup` in the
# Makefile) so the run is not repeated per worker.
pytestmark = pytest.mark.xdist_group(name="smoke_demo")

STAGES = ("vae", "text", "dit")


def test_demo_writes_every_output(smoke_demo):
    workdir, printed, _ = smoke_demo
    for name in ("samples.npz", "samples.gif", "samples.mp4", "eval.json", "samples/contact_sheet.png",
                 "samples/digit_3.gif", "samples/digit_3.mp4", "samples/digits_3_and_7.gif"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for stage in STAGES:
        for name in ("config.json", "metrics.jsonl", "loss.png", "done.json"):
            assert os.path.getsize(os.path.join(workdir, stage, name)) > 0, (stage, name)
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps[-1] == 3  # the smoke config trains 3 steps per stage
        assert os.listdir(os.path.join(workdir, stage, "checkpoints")) == ["3"]
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        videos, prompts = f["videos"], f["prompts"]
    assert videos.dtype == np.uint8 and videos.shape == (2, 8, 32, 32, 1)
    assert list(prompts) == ["digit 3", "digits 3 and 7"]
    with open(os.path.join(workdir, "eval.json")) as f:
        result = json.load(f)
    assert 0.0 <= result["digit_accuracy"] <= 1.0 and result["num_excluded"] == 1
    assert result["vae_reconstruction"]["psnr"] > 0
    assert [s["stage"] for s in result["stages"]] == list(STAGES)
    assert "Digit accuracy" in printed and "PSNR" in printed


def test_demo_rerun_skips_finished_stages(smoke_demo, capsys):
    workdir, _, first_seconds = smoke_demo
    before = {s: os.path.getmtime(os.path.join(workdir, s, "done.json")) for s in STAGES}
    start = time.perf_counter()
    assert cli.main(["demo", "--smoke", "--workdir", workdir]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    for stage in STAGES:
        assert f"{stage}: done earlier (3 steps), skipped" in printed
        assert os.path.getmtime(os.path.join(workdir, stage, "done.json")) == before[stage]
        assert os.listdir(os.path.join(workdir, stage, "checkpoints")) == ["3"]
    assert seconds < 0.6 * first_seconds


def test_demo_bad_steps_scale(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--steps-scale", "0", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "genjax demo: error: --steps-scale=0.0: must be > 0"
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("override, stage", [("--config.dit.num_steps=4", "dit"),
                                              ("--config.vae.model.latent_channels=8", "vae"),
                                              ("--config.text.optim.lr=0.001", "text")])
def test_demo_rerun_with_another_config_refuses(smoke_demo, capsys, override, stage):
    """A stage trained with another config (or on other earlier stages) is neither reused nor
    resumed: one line naming the stage, exit 2, nothing written."""
    workdir = smoke_demo[0]
    before = {s: sorted(os.listdir(os.path.join(workdir, s))) for s in STAGES}
    assert cli.main(["demo", "--smoke", "--workdir", workdir, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its {stage} stage was trained with another config" in err[0], err
    assert {s: sorted(os.listdir(os.path.join(workdir, s))) for s in STAGES} == before
