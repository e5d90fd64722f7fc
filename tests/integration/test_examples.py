"""The README's example trains for real, on one process and under horovodrun."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import background
from tests.helpers.paths import ROOT
from tests.helpers.processes import JobResult, local_horovodrun_command, run_job

EXAMPLE = ROOT / "examples" / "custom_siamese.py"
OWN_TOWER = ROOT / "examples" / "own_tower_triplet.py"


def _final_metrics(output: str) -> dict:
    # horovodrun prefixes each line with "[rank]<stdout>:".
    lines = [re.sub(r"^\[\d+\]<stdout>:", "", line) for line in output.splitlines()]
    results = [line for line in lines if line.startswith("{'loss'")]
    assert len(results) == 1, output[-3000:]  # printed once: by the chief only
    return ast.literal_eval(results[0])


def background_jobs(root: Path) -> dict[str, Callable[[], JobResult]]:
    # Three independent trainings, started two at a time when the module begins.
    horovod = local_horovodrun_command(2, [sys.executable, str(EXAMPLE), "horovod"])
    return {
        "examples/local": lambda: run_job([sys.executable, str(EXAMPLE)], timeout=300),
        "examples/horovod": lambda: run_job(horovod, timeout=300),
        "examples/own_tower": lambda: run_job(
            [sys.executable, str(OWN_TOWER), "mirrored", "2"], timeout=600
        ),
    }


@pytest.mark.slow
@pytest.mark.background("examples/local")
def test_example_trains_locally() -> None:
    job = background.result("examples/local").check()
    assert _final_metrics(job.output)["pair_accuracy"] > 0.85  # chance is 0.5


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.background("examples/horovod")
def test_example_trains_under_horovodrun() -> None:
    job = background.result("examples/horovod").check()
    assert _final_metrics(job.output)["pair_accuracy"] > 0.85


@pytest.mark.slow
@pytest.mark.background("examples/own_tower")
def test_own_tower_example_trains_on_mirrored() -> None:
    """A user's Keras encoder (BatchNormalization, Dropout) shared by 3 streams, 2 replicas."""
    job = background.result("examples/own_tower").check()
    assert _final_metrics(job.output)["triplet_accuracy"] > 0.8  # chance is 0.5
