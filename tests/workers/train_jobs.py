"""Launch train_worker.py under each launcher once per test session and load its JSON.

Results are cached per launcher, so test modules that need the same run (equivalence, fit,
gradients) share one process start instead of paying for it again.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

from dist_share import processes

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, str(Path(__file__).with_name("train_worker.py"))]
TIMEOUT = 300

# What each launcher trains (one process start each): see RUNS in train_worker.py.
LAUNCHES = {
    "local": (
        "shared,shared_accum,two_tower,two_tower_naive,two_tower_dense,shared_fit,shared_k3,"
        "shared_k3_resume"
    ),
    "mirrored": "shared,two_tower,two_tower_naive,shared_fit,shared_resume,shared_k3",
    "horovod_gloo": (
        "shared,two_tower,two_tower_sum,two_tower_fp16,two_tower_naive,shared_fit,two_tower_fit,"
        "shared_resume,shared_bn,shared_k3,shared_k3_resume"
    ),
    "horovod_mpirun": "shared,two_tower",
    "multiworker": "shared,two_tower,shared_fit,shared_resume,shared_k3",
}


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@functools.cache
def run(launcher: str) -> dict[int, dict]:
    """Run the worker under `launcher`; return {rank: result} (raises with the output on failure)."""
    out = os.path.join(tempfile.mkdtemp(prefix=f"dist_share_{launcher}_"), "result")
    args = ["--runs", LAUNCHES[launcher], "--out", out, "--steps", "5", "--batch", "8", "--eval"]
    if launcher == "local":
        processes.run_job([*WORKER, "--strategy", "local", *args], TIMEOUT, _env(), ROOT).check()
        ranks = 1
    elif launcher == "mirrored":
        cmd = [*WORKER, "--strategy", "mirrored", "--num-cpu-devices", "2", "--ids", *args]
        processes.run_job(cmd, TIMEOUT, _env(), ROOT).check()
        ranks = 1
    elif launcher == "horovod_gloo":
        cmd = processes.local_horovodrun_command(
            2, [*WORKER, "--strategy", "horovod", "--ids", *args]
        )
        processes.run_job(cmd, TIMEOUT, _env(), ROOT).check()
        ranks = 2
    elif launcher == "horovod_mpirun":
        cmd = processes.local_mpirun_command(2, [*WORKER, "--strategy", "horovod", *args])
        processes.run_job(cmd, TIMEOUT, _env(), ROOT).check()
        ranks = 2
    elif launcher == "multiworker":
        cmd = [*WORKER, "--strategy", "multiworker", "--ids", *args]
        for r in processes.run_local_multiworker(2, cmd, TIMEOUT, _env(), ROOT):
            r.check()
        ranks = 2
    else:
        raise ValueError(launcher)
    return {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)}
