"""Batch-coupled objectives see the global batch: in-batch softmax and in-batch top-1 computed on
2 replicas (MirroredStrategy on 2 logical CPUs, horovodrun with 2 processes) equal the
single-replica values, gradients included, also when the replicas hold different numbers of rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers.paths import WORKERS
from tests.helpers.processes import run_on_two_replicas

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(400)]

TOL = 1e-5


@pytest.mark.parametrize("launcher", ["mirrored", "horovod"])
def test_global_negatives_and_metric_equal_one_replica(launcher: str, tmp_path: Path) -> None:
    script = WORKERS / "cross_replica_check.py"
    for result in run_on_two_replicas(script, launcher, tmp_path / "result", timeout=300):
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
