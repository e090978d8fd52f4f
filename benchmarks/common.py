"""Shared pieces of the speed benchmarks: thread setup, interleaved timing, the DiT pair, records.

Every benchmark compares genjax (JAX, XLA:CPU) with the PyTorch reference (diffusers, eager) on
the same machine, in the same process, with the same thread count, identical weights and
identical inputs, and reports the median of several repeats and the ratio
torch_time / jax_time (> 1: genjax is faster). Outputs are compared, so a benchmark also proves
that both sides computed the same thing.

Threads (`configure_threads`, called before jax and torch are imported):
  - XLA:CPU sizes its intra-op thread pool with `xla::DefaultThreadPoolSize()`, which reads the
    `NPROC` environment variable and otherwise the CPUs the process may run on; we set
    `NPROC=N` and `XLA_FLAGS=--xla_cpu_multi_thread_eigen=true` (Eigen matmuls / convolutions
    multi-threaded; XLA's default, stated explicitly).
  - torch: `torch.set_num_threads(N)`.
  - If N < os.cpu_count(), the process is also pinned to N CPUs (`os.sched_setaffinity`), which
    bounds both libraries.
N defaults to `os.cpu_count()`. If jax was imported before (pytest), only torch's count is set.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORD_FILE = ROOT / "BENCHMARKS.md"
DIT_S2 = dict(num_layers=12, hidden_size=384, num_heads=6, patch_size=2)


# --------------------------------------------------------------------------- threads, machine

def configure_threads(n: int | None, torch: bool = True) -> dict[str, Any]:
    """Give JAX and torch `n` intra-op threads (default os.cpu_count()); see the module docstring.

    Must run before `import jax` to affect XLA. Returns what was set, for the record.
    """
    n = n or os.cpu_count() or 1
    info: dict[str, Any] = {"threads": n}
    if "jax" not in sys.modules:
        os.environ["NPROC"] = str(n)
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=true").strip()
        if n < (os.cpu_count() or n) and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
            info["affinity"] = sorted(os.sched_getaffinity(0))
        info["XLA_FLAGS"], info["NPROC"] = os.environ["XLA_FLAGS"], n
    else:
        info["jax"] = "imported before configure_threads: XLA keeps its own thread count"
    if torch:
        import torch as torch_lib

        torch_lib.set_num_threads(n)
    return info


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages from /proc/loadavg ("?" where unavailable)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# CPU features that decide XLA's and oneDNN's kernels (the 2.5x-vs-0.6x lesson: say what ran where).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def load_limit() -> float:
    """The 1-minute load above which a figure is not a result: half the cores."""
    return (os.cpu_count() or 1) / 2


def load1() -> float:
    """The 1-minute load average (0.0 where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def machine() -> dict[str, str]:
    """CPU model, instruction sets (`ISA_FLAGS` present), core count, library versions and the
    date, for the record."""
    cpu, isa = platform.processor() or platform.machine(), "?"
    try:
        info = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
        cpu = found.group(1).strip() if found else cpu
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        isa = " ".join(f for f in ISA_FLAGS if flags and f in flags.group(1).split()) or "none of " + " ".join(ISA_FLAGS)
    except OSError:
        pass
    import diffusers
    import flax
    import jax
    import torch

    return {"cpu": cpu, "isa": isa, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib backend": jax.default_backend(),
            "flax": flax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


# --------------------------------------------------------------------------- timing

class Times(dict):
    """`{side: [wall seconds per repeat]}`, with `.cpu = {side: [process CPU seconds per repeat]}`
    (all threads of this process: XLA's pool and torch's; the sides run one at a time)."""

    cpu: dict[str, list[float]]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> Times:
    """Wall and CPU seconds of each zero-argument callable, `repeats` times, alternating between them.

    Each callable must return only when its work is done (JAX: `block_until_ready`).
    Alternating (a, b, a, b, ...) spreads a change in machine load over both sides.
    """
    times = Times({k: [] for k in fns})
    times.cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            times.cpu[name].append(time.process_time() - cpu)
    return times


def cpu_rows(times: Times) -> list[tuple[str, str]]:
    """Table rows of each side's median CPU seconds per repeat and CPU / wall (threads kept busy)."""
    return [(f"{side} CPU s per repeat (median)", f"{median(cpu):.3f} ({median(cpu) / median(times[side]):.2f} x wall)")
            for side, cpu in times.cpu.items()]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def max_rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(max |want|, 1e-12): the agreement figure the benchmarks assert on."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


# --------------------------------------------------------------------------- the DiT pair

def add_dit_args(parser: argparse.ArgumentParser) -> None:
    """Model / input size flags; defaults are DiT-S/2 on batch 8 of 32x32x4 latents."""
    parser.add_argument("--num-layers", type=int, default=DIT_S2["num_layers"])
    parser.add_argument("--hidden-size", type=int, default=DIT_S2["hidden_size"])
    parser.add_argument("--num-heads", type=int, default=DIT_S2["num_heads"])
    parser.add_argument("--patch-size", type=int, default=DIT_S2["patch_size"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side H = W")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)


def dit_pair(args: argparse.Namespace, seed: int = 0):
    """(torch_model, jax_module, jax_params (the bare tree; apply with {"params": ...})): diffusers `DiTTransformer2DModel` with its default
    random init (learn_sigma False: out_channels = in_channels; LayerNorm eps 1e-6 as DiT) and
    the same weights in genjax via `genjax.models.dit.load_diffusers`.

    diffusers keeps a timestep/label embedder in every block (a real checkpoint's copies are
    identical); here all blocks share block 0's module, so torch trains one embedder, as DiT and
    genjax do (gradients and AdamW updates then match).
    """
    import torch
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

    from genjax.models import dit

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=args.num_heads, attention_head_dim=args.hidden_size // args.num_heads,
        in_channels=args.channels, out_channels=args.channels, num_layers=args.num_layers,
        sample_size=args.size, patch_size=args.patch_size, num_embeds_ada_norm=args.num_classes,
        norm_eps=1e-6)
    blocks = model.transformer_blocks
    for block in blocks[1:]:
        block.norm1.emb = blocks[0].norm1.emb
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    module, params = dit.load_diffusers(state, num_heads=args.num_heads)
    return model.eval(), module, params


def dit_sizes(args: argparse.Namespace) -> str:
    """The model / input sizes of `add_dit_args`, for the tables."""
    return (f"{args.num_layers} layers, width {args.hidden_size}, {args.num_heads} heads, patch {args.patch_size}, "
            f"batch {args.batch}, {args.size}x{args.size}x{args.channels} latents")


def dit_inputs(args: argparse.Namespace, seed: int = 0) -> dict[str, np.ndarray]:
    """Latents x (B, H, W, C) N(0, 1) float32, timesteps t (B,) int32 in [0, 1000), labels y (B,)
    int32 in [0, num_classes), target (B, H, W, C) N(0, 1) float32."""
    rng = np.random.default_rng(seed)
    shape = (args.batch, args.size, args.size, args.channels)
    return {"x": rng.standard_normal(shape, np.float32),
            "t": rng.integers(0, 1000, args.batch).astype(np.int32),
            "y": rng.integers(0, args.num_classes, args.batch).astype(np.int32),
            "target": rng.standard_normal(shape, np.float32)}


def nchw(x: np.ndarray):
    """A channels-last numpy array as a contiguous NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


# --------------------------------------------------------------------------- flags, output, record

def base_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for both JAX and torch (default: os.cpu_count())")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per side")
    parser.add_argument("--record", action="store_true",
                        help="write this result into its section of BENCHMARKS.md (refused while the "
                             "1-minute load exceeds half the cores, unless --force)")
    parser.add_argument("--force", action="store_true",
                        help="--record on a loaded machine; the record then says LOADED")
    return parser


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def record(name: str, title: str, result: dict[str, Any], rows: list[tuple[str, str]],
           argv: list[str], path: Path | None = None) -> None:
    """Write (or replace) the section of benchmark `name` in BENCHMARKS.md.

    The section sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers; a missing
    file or section is created / appended. It holds the result table, the machine, the load
    averages before and after, and the exact command.
    """
    path = path or RECORD_FILE
    info = result["machine"]
    command = " ".join(["python", f"benchmarks/{name}.py", *argv])
    lines = [f"<!-- bench:{name} -->", f"### {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", f"Machine: {info['cpu']}, {info['cores']} cores, {result['threads']['threads']} threads each side; "
              f"Python {info['python']}, jax {info['jax']}, flax {info['flax']}, torch {info['torch']}, "
              f"diffusers {info['diffusers']}; {info['date']}.",
              f"ISA: {info.get('isa', '?')}.",
              f"Load average (1/5/15 min) before: {result['load_before']}, after: {result['load_after']}"
              + (f" — LOADED (1-minute load above {load_limit():g}, half the cores; recorded with --force: "
                 "not a result)." if result.get("loaded") else "."),
              "", f"Command: `{command}`", f"<!-- /bench:{name} -->"]
    section = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def check_agree(what: str, got, want, tol: float) -> float:
    """`max_rel_diff(got, want)`, raising AssertionError if it exceeds `tol`."""
    diff = max_rel_diff(got, want)
    if not diff <= tol:
        raise AssertionError(f"{what}: JAX and torch differ by {diff:.3g} (relative to max |torch|) > {tol}")
    return diff


def check_quiet(args: argparse.Namespace, when: str) -> bool:
    """Whether the machine is loaded (1-minute load > half the cores); with --record and no
    --force, a loaded machine stops the benchmark with one line (SystemExit 2)."""
    loaded = load1() > load_limit()
    if loaded and getattr(args, "record", False) and not getattr(args, "force", False):
        print(f"--record: the 1-minute load is {load1():.2f} {when}, above {load_limit():g} (half of "
              f"{os.cpu_count()} cores): a loaded machine's figure is not a result; re-run when the "
              "machine is quiet, or pass --force to record it marked LOADED", file=sys.stderr)
        raise SystemExit(2)
    return loaded


def start(args: argparse.Namespace, torch: bool = True) -> dict[str, Any]:
    """Refuse --record on a loaded machine (`check_quiet`), configure threads (before jax / torch
    are imported) and note the load average."""
    loaded = check_quiet(args, "before the run")
    return {"threads": configure_threads(args.threads, torch), "load_before": loadavg(), "loaded": loaded}


def finish(name: str, title: str, args: argparse.Namespace, argv: list[str] | None,
           context: dict[str, Any], result: dict[str, Any], rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Add the machine, thread and load figures to `result`, print the table, write
    BENCHMARKS.md with --record; returns `result`."""
    loaded_after = load1() > load_limit()  # a load that rose during the run marks a forced record too
    if loaded_after and args.record and not getattr(args, "force", False):
        check_quiet(args, "after the run")
    result = {"benchmark": name, **result, **context, "load_after": loadavg(), "machine": machine()}
    result["loaded"] = bool(context.get("loaded")) or loaded_after
    print_table(title, rows)
    if args.record:
        record(name, title, result, rows, list(sys.argv[1:] if argv is None else argv))
        print(f"recorded in {RECORD_FILE.name}")
    return result
