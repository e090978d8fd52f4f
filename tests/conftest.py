"""Test setup: force 8 host CPU devices so sharding is tested on CPU.

This must run before JAX initialises its backends, which is why it sits at import time of the
conftest (pytest imports it before any test module).
"""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# Test programs are tiny and compiled once each: XLA:CPU's LLVM optimisation passes cost more than
# they save (threefry RNG in a model's init compiles ~2x faster without them). Subprocesses the
# tests start (genjax train, multi-host runs) inherit the same flags.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep each xdist worker from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
