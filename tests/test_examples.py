"""The README's example trains for real, on one process and under horovodrun."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from dist_share.processes import local_horovodrun_command, run_job

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_siamese.py"


def _final_metrics(output: str) -> dict:
    # horovodrun prefixes each line with "[rank]<stdout>:".
    lines = [re.sub(r"^\[\d+\]<stdout>:", "", line) for line in output.splitlines()]
    results = [line for line in lines if line.startswith("{'loss'")]
    assert len(results) == 1, output[-3000:]  # printed once: by the chief only
    return ast.literal_eval(results[0])


@pytest.mark.slow
def test_example_trains_locally() -> None:
    job = run_job([sys.executable, str(EXAMPLE)], timeout=300).check()
    assert _final_metrics(job.output)["pair_accuracy"] > 0.85  # chance is 0.5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_example_trains_under_horovodrun() -> None:
    job = run_job(
        local_horovodrun_command(2, [sys.executable, str(EXAMPLE), "horovod"]), timeout=300
    )
    assert _final_metrics(job.check().output)["pair_accuracy"] > 0.85
