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


import pytest  # noqa: E402  (after the XLA flags above)


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory):
    """(workdir, stdout, wall seconds) of one `genjax demo --smoke` run, shared by test_demo.py and
    test_sample.py (defined here once, so both files use the same session-scoped run)."""
    import contextlib
    import io
    import time

    from genjax import cli

    workdir = str(tmp_path_factory.mktemp("demo"))
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        assert cli.main(["demo", "--smoke", "--workdir", workdir]) == 0
    return workdir, out.getvalue(), time.perf_counter() - start


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` group again: pytest-xdist 3.8 marks an `xdist_group` test by
    suffixing `item._nodeid` with "@group", which pytest 9 no longer reads (a node's id lives in
    `item._id`), so the groups were split over workers and the smoke demo ran twice. The same
    suffix is applied here through pytest's own id type (a no-op where xdist's still works)."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id  # pytest >= 9
    except ImportError:  # pytest 8: xdist's own suffix works
        return

    for item in items:
        names = sorted({m.args[0] if m.args else m.kwargs.get("name", "default")
                        for m in item.iter_markers("xdist_group")})
        if names and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
