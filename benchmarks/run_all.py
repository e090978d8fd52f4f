"""Run every speed benchmark at its default sizes, each in a fresh process, and record the results.

    make bench                                     # = .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --only ddim_loop,train_step --no-record --threads 2

Each benchmark runs as `python benchmarks/NAME.py --record [--threads N]` in its own process
(threads must be configured before jax and torch are imported), so BENCHMARKS.md gets the same
command line as a single rerun. A benchmark refuses to record while the 1-minute load exceeds half
the cores (`common.check_quiet`; `--force` records it marked LOADED). On a 2-core CPU the four take about 20-30 minutes; the DDIM loop
is the longest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = ("dit_fwd_bwd", "train_step", "ddim_loop", "compile_time")
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=None, help="passed to every benchmark")
    parser.add_argument("--force", action="store_true",
                        help="record even on a loaded machine (each record then says LOADED)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    extra = [] if args.no_record else ["--record", *(["--force"] if args.force else [])]
    extra += [] if args.threads is None else ["--threads", str(args.threads)]
    failed = []
    for name in names:
        print(f"== {name} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra], cwd=HERE.parent)
        print(f"== {name}: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
