"""Smoke tests of benchmarks/: each script's main() at tiny sizes, 1 repeat.

Each run also checks (inside main) that genjax and the torch reference agree on what they
computed, so these tests fail if the two sides stop computing the same thing.
"""

import math
import os

import pytest

from benchmarks import common, compile_time, context_memory, ddim_loop, dit_fwd_bwd, packed_vs_padded, train_step

TINY_DIT = ["--num-layers", "1", "--hidden-size", "32", "--num-heads", "2", "--batch", "2", "--size", "4",
            "--num-classes", "10", "--repeats", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """configure_threads may pin the process and sets torch's thread count; undo it for other tests."""
    import torch

    affinity, torch_threads = os.sched_getaffinity(0), torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("NPROC", "XLA_FLAGS")}
    yield
    os.sched_setaffinity(0, affinity)
    torch.set_num_threads(torch_threads)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _check_result(result, ratio_keys=("jax_s", "torch_s")):
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    for key in ratio_keys:
        assert result[key] > 0
    assert result["machine"]["cores"] and result["load_before"] and result["load_after"]


def test_ddim_loop():
    result = ddim_loop.main(TINY_DIT + ["--num-steps", "3"])
    _check_result(result, ("jax_s_per_step", "torch_s_per_step"))
    assert result["denoiser_traces"] == 1  # 3 steps, one trace: the loop is a scan, not unrolled
    assert result["max_rel_diff"] <= 1e-3


def test_dit_fwd_bwd():
    result = dit_fwd_bwd.main(TINY_DIT)
    _check_result(result)
    assert result["loss_rel_diff"] <= 1e-3 and result["grad_norm_rel_diff"] <= 1e-3


def test_train_step():
    result = train_step.main(TINY_DIT)
    _check_result(result)
    for side in ("jax", "torch"):  # each side's CPU time beside its wall time
        assert len(result["cpu_times"][side]) == 1 and result["cpu_times"][side][0] > 0
    assert result["machine"]["isa"]
    assert len(result["losses"]["jax"]) == len(result["losses"]["torch"]) == 2  # warm-up + 1
    assert result["change_norms"][0] > 0  # the parameters moved


@pytest.mark.slow  # two XLA compiles of a train step: ~30 s of CPU
def test_compile_time():
    result = compile_time.main(["--variant", "S/8", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
                                "--size", "8", "--batch", "2", "--repeats", "1", "--no-warmup"])
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert result["scan"]["compile_s"] > 0 and result["unrolled"]["compile_s"] > 0


def test_context_memory():
    """Tiny sizes: a row per (context, strategy) with XLA's per-device figures; 2 heads over
    context 4 is Ulysses' one-line error, caught at trace time (nothing compiled for it)."""
    result = context_memory.main(["--seq-len", "64", "--contexts", "1,2", "--hidden-size", "32", "--num-heads", "2",
                                  "--depth", "1"])
    rows = [(r["context"], r["strategy"]) for r in result["records"]]
    assert rows == [(1, "none"), (2, "ring"), (2, "ulysses")]
    assert all(r["temp"] > 0 and r["argument"] > 0 and r["output"] > 0 for r in result["records"])
    assert result["table"].count("\n") == 4
    [error] = context_memory.measure(64, [4], ["ulysses"], hidden=32, depth=1, heads=2)
    assert error["error"].startswith("num_heads=2: Ulysses needs") and "temp" not in error


def test_check_agree_raises_on_mismatch():
    assert common.check_agree("x", [1.0, 2.0], [1.0, 2.0005], 1e-3) <= 1e-3
    with pytest.raises(AssertionError, match="differ"):
        common.check_agree("x", [1.0, 2.0], [1.0, 2.01], 1e-3)


def test_record_writes_and_replaces_its_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    machine = dict(cpu="cpu", cores="2", python="3", jax="j", flax="f", torch="t", diffusers="d", date="now")
    result = {"machine": machine, "threads": {"threads": 2}, "load_before": "1 1 1", "load_after": "2 2 2"}
    common.record("a", "A", result, [("ratio", "1.50")], ["--x"], path)
    common.record("b", "B", result, [("ratio", "3.00")], [], path)
    common.record("a", "A", result, [("ratio", "2.50")], [], path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- bench:a -->") == 1 and "| ratio | 2.50 |" in text and "1.50" not in text
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->") and "| ratio | 3.00 |" in text
    assert "Command: `python benchmarks/a.py`" in text


def test_record_is_refused_on_a_loaded_machine_unless_forced(monkeypatch, tmp_path, capsys):
    """Issue 20: a figure from a machine whose 1-minute load exceeds half the cores is not a result."""
    parser = common.base_parser("x", 1)
    monkeypatch.setattr(common, "load1", lambda: common.load_limit() + 0.5)
    with pytest.raises(SystemExit) as stop:
        common.start(parser.parse_args(["--record"]), torch=False)
    assert stop.value.code == 2 and "not a result" in capsys.readouterr().err
    assert common.start(parser.parse_args([]), torch=False)["loaded"]  # without --record: runs, noted
    context = common.start(parser.parse_args(["--record", "--force"]), torch=False)
    path = tmp_path / "BENCHMARKS.md"
    result = {"machine": dict(cpu="c", isa="avx2", cores="2", python="3", jax="j", flax="f", torch="t",
                              diffusers="d", date="now"), **context, "load_after": "3 3 3"}
    common.record("a", "A", result, [("ratio", "1.00")], [], path)
    assert "LOADED" in path.read_text() and "ISA: avx2." in path.read_text()
    monkeypatch.setattr(common, "load1", lambda: 0.0)
    assert not common.start(parser.parse_args(["--record"]), torch=False)["loaded"]


@pytest.mark.slow  # four XLA compiles of the trainer's step (padded, packed, two buckets): ~1 min of CPU
def test_packed_vs_padded():
    """2 examples of different shapes: one step shape each for padded and packed, two buckets;
    every method sees the same tokens, padded pads, buckets never do."""
    result = packed_vs_padded.main(["--examples", "2", "--batch", "1", "--repeats", "1"])
    assert math.isfinite(result["ratio"]) and math.isfinite(result["ratio_buckets"])
    for method in ("padded", "packed", "buckets"):
        st = result[method]
        assert st["seconds"] > 0 and st["useful_tokens"] == result["packed"]["useful_tokens"] > 0
    assert result["padded"]["steps"] == 2 and result["padded"]["compiled_shapes"] == 1
    assert result["packed"]["compiled_shapes"] == 1 and result["buckets"]["compiled_shapes"] == 2
    assert result["buckets"]["padding_fraction"] == 0 < result["padded"]["padding_fraction"]
    assert result["load_before"] and result["load_after"]
