"""Smoke tests: the real Horovod, MPI and tf.distribute stacks work on this machine.

These are the first thing to fail when the set-up is broken, so each names what it exercises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_share.processes import (
    local_horovodrun_command,
    local_mpirun_command,
    run_job,
    run_local_multiworker,
)

WORKERS = Path(__file__).parent / "workers"


def _read_ranks(out: Path, prefix: str, n: int) -> list[dict]:
    files = sorted(out.glob(f"{prefix}*.json"))
    assert len(files) == n, f"expected {n} result files, found {[f.name for f in files]}"
    return [json.loads(f.read_text()) for f in files]


def _check_horovod(results: list[dict]) -> None:
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["size"] == 2
        assert r["summed"] == [3.0, 30.0]  # (1 + 2), (10 + 20)
        assert r["averaged"] == pytest.approx(0.5)
        assert r["variable"] == [0.5, 0.5, 0.5]  # rank 0's initial value everywhere


@pytest.mark.multiprocess
def test_horovodrun_gloo_allreduce_and_broadcast(tmp_path: Path) -> None:
    cmd = local_horovodrun_command(
        2, [sys.executable, str(WORKERS / "smoke_horovod.py"), str(tmp_path)]
    )
    run_job(cmd, timeout=180).check()
    results = _read_ranks(tmp_path, "rank", 2)
    _check_horovod(results)
    assert all(r["gloo"] for r in results)


@pytest.mark.multiprocess
def test_mpirun_allreduce_and_broadcast(tmp_path: Path) -> None:
    cmd = local_mpirun_command(
        2, [sys.executable, str(WORKERS / "smoke_horovod.py"), str(tmp_path)]
    )
    run_job(cmd, timeout=180).check()
    results = _read_ranks(tmp_path, "rank", 2)
    _check_horovod(results)
    assert all(r["mpi"] for r in results)


@pytest.mark.multiprocess
def test_mirrored_strategy_on_two_cpu_devices(tmp_path: Path) -> None:
    cmd = [sys.executable, str(WORKERS / "smoke_tf_strategy.py"), "mirrored", str(tmp_path)]
    run_job(cmd, timeout=180).check()
    (result,) = _read_ranks(tmp_path, "mirrored", 1)
    assert result["replicas"] == 2
    assert result["values"] == [3.0, 3.0]  # 1 + 2 on both replicas


@pytest.mark.multiprocess
def test_multiworker_mirrored_two_local_processes(tmp_path: Path) -> None:
    argv = [sys.executable, str(WORKERS / "smoke_tf_strategy.py"), "multiworker", str(tmp_path)]
    for job in run_local_multiworker(2, argv, timeout=240):
        job.check()
    results = _read_ranks(tmp_path, "multiworker", 2)
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
    code = (
        "import sys, dist_share, dist_share.processes\n"
        "import importlib.util\n"
        "for m in ('strategies', 'training', 'towers', 'models', 'cli', 'config', 'data'):\n"
        "    if importlib.util.find_spec('dist_share.' + m):\n"
        "        __import__('dist_share.' + m)\n"
        "assert 'horovod' not in sys.modules, sorted(m for m in sys.modules if 'horovod' in m)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
