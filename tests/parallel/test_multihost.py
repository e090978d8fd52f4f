"""Two processes on loopback, started the way a cluster starts them: with the variables SLURM or
JAX_COORDINATOR_ADDRESS set, and nothing else (each process has 4 CPU devices, 8 in all)."""

import os
import random
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "dit_mnist.py")
SLURM_PORTS = 61440  # JAX's SLURM port: 61440 + SLURM_JOB_ID % 4096


def free_port(low: int = 20000, high: int = 65535) -> int:
    for _ in range(100):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high}]")


def launch_pair(args, launcher_env) -> list[tuple[int, str, str]]:
    """Run `python args...` as processes 0 and 1; `launcher_env(i)` gives process i's variables.
    Returns (exit status, stdout without gloo's chatter, stderr) of each."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                                 "OMPI_", "TPU_", "MEGASCALE_"))}
    base.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, *args(i)], cwd=ROOT, env={**base, **launcher_env(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        # gloo's "[Gloo] Rank i is connected to n peer ranks" lines, sometimes split from their prefix
        stdout = "".join(line for line in stdout.splitlines(True)
                         if not line.startswith("[Gloo]") and "peer ranks" not in line)
        out.append((p.returncode, stdout, stderr))
    return out


_SCRIPT = r'''
from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib
assert mesh_lib.initialize_distributed() is True
import jax
print(mesh_lib.describe(mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})))
mesh_lib.check_same_on_all_hosts("config", {"model": {"depth": 2}, "seed": 0})  # agree: passes
try:
    mesh_lib.check_same_on_all_hosts("config", {"model": {"depth": 2}, "seed": jax.process_index()})
except UserError as e:
    print(e)
'''


def test_jax_variables_start_two_processes_that_compare_configs():
    port = free_port()
    runs = launch_pair(lambda i: ["-c", _SCRIPT], lambda i: {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i)})
    for i, (status, out, err) in enumerate(runs):
        assert status == 0, err[-3000:]
        assert out.splitlines() == [
            f"process {i}/2: 4 local of 8 cpu devices, mesh data=4 fsdp=2 context=1 tensor=1",
            (f"config.seed={i}: process {1 - i} has {1 - i}; every host must run the same config "
             f"(same file, overrides and code)")]


def test_slurm_tasks_with_different_configs_stop_with_one_line(tmp_path):
    """`srun -n 2 genjax train ...` where the two tasks got different overrides: no JAX_*
    variable is set; both tasks stop with status 2 and one line, before anything compiles."""
    port = free_port(SLURM_PORTS)
    workdir = str(tmp_path / "run")

    def args(i):
        return ["-m", "genjax.cli", "train", "--config", f"{CONFIG}:smoke=True",
                "--workdir", workdir, f"--config.optim.lr={[1e-3, 2e-3][i]}"]

    runs = launch_pair(args, lambda i: {
        "SLURM_JOB_ID": str(port - SLURM_PORTS), "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
    for i, (status, out, err) in enumerate(runs):
        assert status == 2, err[-3000:]
        mine, theirs = [0.001, 0.002][i], [0.001, 0.002][1 - i]
        assert err.strip().splitlines() == [
            (f"genjax train: error: config.optim.lr={mine}: process {1 - i} has {theirs}; "
             f"every host must run the same config (same file, overrides and code)")]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # stopped before training

