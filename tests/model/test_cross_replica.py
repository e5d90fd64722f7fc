"""Batch-coupled objectives see the global batch: in-batch softmax (with and without its
corrections), mined triplets and pairs, in-batch top-1 and recall@1 computed on 2 replicas
(MirroredStrategy on 2 logical CPUs, horovodrun with 2 processes) equal the single-replica
values, gradients included, also when the replicas hold different numbers of rows; duplicates
of a row's positive that sit on the other replica are masked."""

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
        cases = ("even", "uneven", "batch_hard", "semi_hard", "contrastive_batch_hard")
        for case in (*cases, "corrected"):
            diffs = result["cases"][case]
            assert diffs["loss"] < TOL and diffs["grad"] < TOL and diffs["metric"] == 0, (
                case,
                diffs,
            )
        # Per-replica negatives are a different objective: the comparison above can fail.
        local = result["cases"]["even_local_negatives"]
        assert local["loss"] > 1e-2 and local["grad"] > 1e-2, local
        # ... and so is the corrected loss without the other replica's duplicates.
        assert result["masked_elsewhere"] > 0, "no positive had a duplicate on another replica"
        # Step 0 on random unit embeddings at temperature 1: each query sees the whole global
        # batch's candidates (log 64), not its replica's (log 32).
        random = result["random_loss"]
        assert abs(random["global"] - math.log(random["global_batch"])) < 0.05, random
        assert abs(random["local"] - math.log(random["replica_batch"])) < 0.05, random
