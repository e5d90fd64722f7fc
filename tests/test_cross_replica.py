"""Batch-coupled objectives see the global batch: in-batch softmax and in-batch top-1 computed on
2 replicas (MirroredStrategy on 2 logical CPUs, horovodrun with 2 processes) equal the
single-replica values, gradients included, also when the replicas hold different numbers of rows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import local_horovodrun_command, run_job, worker_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

WORKER = str(Path(__file__).parent / "workers" / "cross_replica_check.py")
TOL = 1e-5


@pytest.mark.parametrize("launcher", ["mirrored", "horovod"])
def test_global_negatives_and_metric_equal_one_replica(launcher: str, tmp_path: Path) -> None:
    out = tmp_path / "result"
    argv = [sys.executable, WORKER, "--out", str(out)]
    if launcher == "mirrored":
        command = [*argv, "--strategy", "mirrored", "--num-cpu-devices", "2"]
    else:
        command = local_horovodrun_command(2, [*argv, "--strategy", "horovod"])
    run_job(command, timeout=300, env=worker_env()).check()
    files = sorted(tmp_path.glob("result.rank*.json"))
    assert len(files) == (1 if launcher == "mirrored" else 2)
    for path in files:
        result = json.loads(path.read_text())
        assert result["num_replicas"] == 2
        for case in ("even", "uneven"):
            diffs = result["cases"][case]
            assert diffs["loss"] < TOL and diffs["grad"] < TOL and diffs["top1"] == 0, (case, diffs)
        # Per-replica negatives are a different objective: the comparison above can fail.
        local = result["cases"]["even_local_negatives"]
        assert local["loss"] > 1e-2 and local["grad"] > 1e-2, local
        # Step 0 on random unit embeddings at temperature 1: each query sees the whole global
        # batch's candidates (log 64), not its replica's (log 32).
        random = result["random_loss"]
        assert abs(random["global"] - math.log(random["global_batch"])) < 0.05, random
        assert abs(random["local"] - math.log(random["replica_batch"])) < 0.05, random
