"""Smoke tests: the real Horovod, MPI and tf.distribute stacks work on this machine.

These are the first thing to fail when the set-up is broken, so each names what it exercises.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import train_jobs
from tests.helpers.paths import EXE


# The collectives run in the session's shared launches (tests/helpers/train_jobs.py): one
# TensorFlow and Horovod start per process for these checks and the training tests together.
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("launcher", "transport"),
    [("horovod_gloo", "gloo"), ("horovod_mpirun", "mpi")],
    ids=["horovodrun_gloo", "mpirun"],
)
def test_horovod_allreduce_and_broadcast(launcher: str, transport: str) -> None:
    results = train_jobs.check(launcher, "horovod_collectives")
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["size"] == 2
        assert r["summed"] == [3.0, 30.0]  # (1 + 2), (10 + 20)
        assert r["averaged"] == pytest.approx(0.5)
        assert r["variable"] == [0.5, 0.5, 0.5]  # rank 0's initial value everywhere
    assert all(r[transport] for r in results)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("launcher", "processes", "values"),
    [("mirrored", 1, [3.0, 3.0]), ("multiworker", 2, [3.0])],
    ids=["mirrored_two_cpu_devices", "multiworker_two_local_processes"],
)
def test_tf_strategy_all_reduce(launcher: str, processes: int, values: list[float]) -> None:
    """1 + 2 on every replica: MirroredStrategy's two replicas in one process, or one replica
    per process under MultiWorkerMirrored."""
    results = train_jobs.check(launcher, "tf_all_reduce")
    assert len(results) == processes
    for r in results:
        assert r["replicas"] == 2
        assert r["values"] == values


def test_cli_version_and_help() -> None:
    from dist_share import __version__

    out = subprocess.run([EXE, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout
    out = subprocess.run([EXE, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: dist-share" in out.stdout


def test_import_does_not_load_horovod() -> None:
    # Every module of the package, the launcher side and the in-job side.
    code = (
        "import importlib, pkgutil, sys, dist_share\n"
        "names = [m.name for m in pkgutil.walk_packages(dist_share.__path__, 'dist_share.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert len(names) > 40, names\n"
        "assert 'horovod' not in sys.modules, sorted(m for m in sys.modules if 'horovod' in m)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
