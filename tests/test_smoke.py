"""Smoke tests: the real Horovod, MPI and tf.distribute stacks work on this machine.

These are the first thing to fail when the set-up is broken, so each names what it exercises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))

import train_jobs  # noqa: E402


def _check_horovod(results: list[dict]) -> None:
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["size"] == 2
        assert r["summed"] == [3.0, 30.0]  # (1 + 2), (10 + 20)
        assert r["averaged"] == pytest.approx(0.5)
        assert r["variable"] == [0.5, 0.5, 0.5]  # rank 0's initial value everywhere


# The collectives run in the session's shared launches (tests/workers/train_jobs.py): one
# TensorFlow and Horovod start per process for these checks and the training tests together.
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_horovodrun_gloo_allreduce_and_broadcast() -> None:
    results = train_jobs.check("horovod_gloo", "horovod_collectives")
    _check_horovod(results)
    assert all(r["gloo"] for r in results)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_mpirun_allreduce_and_broadcast() -> None:
    results = train_jobs.check("horovod_mpirun", "horovod_collectives")
    _check_horovod(results)
    assert all(r["mpi"] for r in results)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_mirrored_strategy_on_two_cpu_devices() -> None:
    (result,) = train_jobs.check("mirrored", "tf_all_reduce")
    assert result["replicas"] == 2
    assert result["values"] == [3.0, 3.0]  # 1 + 2 on both replicas


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_multiworker_mirrored_two_local_processes() -> None:
    results = train_jobs.check("multiworker", "tf_all_reduce")
    assert len(results) == 2
    for r in results:
        assert r["replicas"] == 2
        assert r["values"] == [3.0]


def test_cli_version_and_help() -> None:
    from dist_share import __version__

    exe = Path(sys.executable).parent / "dist-share"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
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
