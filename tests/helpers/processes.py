"""Run a local multi-process job (horovodrun, mpirun, or N multi-worker processes) and always clean up.

Tests and benchmarks start real distributed jobs on this machine. Each job runs in its own
process group so that a timeout kills the launcher *and* every worker it spawned, and the
combined output is kept so that a failure shows what the workers printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dist_share.launch.commands import horovodrun_command, mpirun_command, tf_config
from dist_share.launch.hosts import Host, free_port
from dist_share.launch.supervise import kill_process_group
from tests.helpers.paths import EXE, ROOT

__all__ = [
    "JobResult",
    "dist_share_launch",
    "kill_when",
    "local_horovodrun_command",
    "local_mpirun_command",
    "run_job",
    "run_local_multiworker",
    "run_on_two_replicas",
    "worker_env",
]


@dataclass
class JobResult:
    returncode: int
    output: str
    command: list[str]

    def check(self) -> JobResult:
        if self.returncode != 0:
            raise RuntimeError(
                f"job failed with exit code {self.returncode}: {' '.join(self.command)}\n"
                f"--- output (last 6000 chars) ---\n{self.output[-6000:]}"
            )
        return self


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for local workers: quiet TF, one thread pool per process, root allowed for
    Open MPI, and the repository root on PYTHONPATH (the scripts in tests/workers import
    ``tests.workers`` modules)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Open MPI refuses to run as root unless told; our machines and containers run as root.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # Horovod under Gloo/MPI on one host: keep collectives on loopback.
    env.setdefault("HOROVOD_GLOO_IFACE", "lo")
    # Make the venv's launchers (horovodrun, mpirun wrappers) and this interpreter visible.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


def _start(
    argv: Sequence[str], env: Mapping[str, str] | None, cwd: str | os.PathLike | None
) -> subprocess.Popen:
    """Start `argv` as the leader of a new process group, output captured in one stream."""
    return subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_env(env),
        cwd=cwd,
        start_new_session=True,
    )


def run_job(
    command: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> JobResult:
    """Run `command` in a new process group; on timeout kill the whole group and raise."""
    proc = _start(command, env, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
        raise TimeoutError(
            f"job timed out after {timeout:.0f}s and was killed: {' '.join(command)}\n{out[-6000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            kill_process_group(proc)
    return JobResult(proc.returncode, out, list(command))


def dist_share_launch(
    launcher: str, argv: Sequence[str], *options: str, hosts: str | None = "localhost:2"
) -> list[str]:
    """``dist-share launch --launcher LAUNCHER [--hosts HOSTS] OPTIONS... -- ARGV``."""
    where = ["--hosts", hosts] if hosts else []
    return [EXE, "launch", "--launcher", launcher, *where, *options, "--", *argv]


def local_horovodrun_command(
    num_proc: int, argv: Sequence[str], transport: str = "gloo"
) -> list[str]:
    """`horovodrun -np N` on localhost with Gloo, or with MPI underneath (transport='mpi')."""
    return horovodrun_command([Host("localhost", num_proc)], argv, transport=transport)


def local_mpirun_command(
    num_proc: int, argv: Sequence[str], yield_when_idle: bool = True
) -> list[str]:
    """Open MPI's `mpirun -np N` on this host over loopback, as `dist-share launch` writes it.

    ``yield_when_idle=False`` leaves out ``-mca mpi_yield_when_idle 1``: only the benchmark
    that measures what the flag is worth wants that.
    """
    cmd = mpirun_command(
        [Host("localhost", num_proc)],
        argv,
        network_interface="lo",
        allow_run_as_root=True,
        yield_when_idle=yield_when_idle,
    )
    # Local jobs share few cores: allow more ranks than cores (mpirun_command already makes a
    # waiting rank yield its core: measured 1.5-2.2x faster on 2 cores, bench_scaling.py).
    return [cmd[0], "--oversubscribe", *cmd[1:]]


def run_local_multiworker(
    num_workers: int,
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> list[JobResult]:
    """Start `num_workers` copies of `argv`, each with its TF_CONFIG on free loopback ports.

    All workers run concurrently (the collective needs every one of them); if any fails or the
    deadline passes, the rest are killed.
    """
    workers = [f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(num_workers)]
    procs = []
    deadline = time.monotonic() + timeout
    try:
        for i in range(num_workers):
            wenv = dict(env or {})
            wenv["TF_CONFIG"] = tf_config(workers, i)
            procs.append(_start(argv, wenv, cwd))
        results = []
        for p in procs:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                out, _ = p.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"multi-worker job timed out after {timeout:.0f}s: {' '.join(argv)}"
                ) from None
            results.append(JobResult(p.returncode, out, list(argv)))
            if p.returncode != 0:
                break
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                kill_process_group(p)


def kill_when(
    argv: Sequence[str],
    ready: Callable[[], bool],
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> None:
    """Start `argv` in its own process group, SIGKILL the group once ``ready()`` holds, and
    wait for it. Fails if the process ends first or ``ready()`` does not hold in `timeout` s.
    (Its output is dropped, so that a full pipe never stalls it; what it printed to stderr
    is shown if it ends early.)"""
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=worker_env(env), cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"ended before it could be killed:\n{proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready to be killed after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def run_on_two_replicas(script: Path, launcher: str, out: Path, timeout: float) -> list[dict]:
    """Run a check script of tests/workers (tests/workers/replicas.py) on 2 replicas,
    MirroredStrategy on 2 logical CPUs in one process or ``horovodrun -np 2``, and return what
    each process wrote to ``OUT.rank{R}.json``, in rank order (each saw 2 replicas)."""
    argv = [sys.executable, str(script), "--out", str(out)]
    if launcher == "mirrored":
        command = [*argv, "--strategy", "mirrored", "--num-cpu-devices", "2"]
    else:
        command = local_horovodrun_command(2, [*argv, "--strategy", "horovod"])
    run_job(command, timeout=timeout).check()
    files = sorted(out.parent.glob(f"{out.name}.rank*.json"))
    assert len(files) == (1 if launcher == "mirrored" else 2)
    results = [json.loads(path.read_text()) for path in files]
    assert all(result["num_replicas"] == 2 for result in results), results
    return results
