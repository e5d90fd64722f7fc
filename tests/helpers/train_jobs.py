"""Launch tests/workers/train_worker.py under each launcher once per session and load its JSON.

Results are cached per launcher, so test modules that need the same run (equivalence, fit,
gradients, records, smoke, models) share one process start instead of paying for it again:
TensorFlow's start, Horovod's and the launcher's are most of a small run's cost. `start`
launches several in the background, two at a time (on the session's shared pool,
background.py): one launch alone leaves a core idle while its processes start TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.helpers import background, processes
from tests.helpers.paths import ROOT, WORKERS
from tests.workers.train_worker import COUPLED_MODELS

WORKER = [sys.executable, str(WORKERS / "train_worker.py")]
# One launch trains every run below and runs its checks (a minute or two on a loaded 2-core
# machine); the tests that start a launch have timeouts above this.
TIMEOUT = 600

# What each launcher trains (see RUNS in train_worker.py), then checks (CHECKS there), in one
# process start per process.
COUPLED = ",".join(COUPLED_MODELS)
COUPLED_FIT = "siamese_cfg_fit,two_tower_ibs_fit,triplet_mined_fit,two_tower_corrected_fit"
COUPLED_SUM = (
    "siamese_cfg_sum,two_tower_ibs_sum,multiview_bn_sum,user_bn_sum,triplet_mined_sum,"
    "two_tower_corrected_sum"
)
ACCUM = "two_tower_ibs_accum,two_tower_corrected_accum"
# XLA and the precision policies (tests/train/test_precision.py).
SPEED = "shared_xla,two_tower_xla,shared_bf16,shared_fp16,shared_bf16_xla"
LAUNCHES = {
    "local": (
        "shared,shared_accum,two_tower,two_tower_naive,two_tower_dense,shared_fit,shared_k3,"
        f"shared_k3_resume,user_tower,shared_12,two_tower_corrected_12,{COUPLED},{COUPLED_FIT},{ACCUM},"
        f"{SPEED}",
        "",
    ),
    "mirrored": (
        "shared,two_tower,two_tower_naive,shared_fit,shared_resume,shared_k3,user_tower,"
        f"{COUPLED},{COUPLED_FIT},{ACCUM},{SPEED}",
        "tf_all_reduce,dense_switch,model_families,xla_coupled",
    ),
    "horovod_gloo": (
        "shared,two_tower,two_tower_sum,two_tower_fp16,two_tower_naive,shared_fit,two_tower_fit,"
        f"shared_resume,shared_bn,shared_k3,shared_k3_resume,user_tower,{COUPLED},{COUPLED_FIT},"
        f"{COUPLED_SUM},{ACCUM},{SPEED}",
        "horovod_collectives,dense_switch,records,signals,xla_coupled",
    ),
    "horovod_mpirun": (f"shared,two_tower,{COUPLED}", "horovod_collectives"),
    "multiworker": (
        f"shared,two_tower,shared_fit,shared_resume,shared_k3,{COUPLED},{COUPLED_FIT}",
        "tf_all_reduce,records",
    ),
}


def start(*launchers: str) -> None:
    """Launch these in the background (each once per session; two run at a time)."""
    for launcher in launchers:
        background.start(f"train_jobs/{launcher}", lambda launcher=launcher: _launch(launcher))


def run(launcher: str) -> dict[int, dict]:
    """The worker's results under `launcher`, {rank: result}, launched now unless `start` did
    already (raises with the output on failure)."""
    start(launcher)
    return background.result(f"train_jobs/{launcher}")


def _launch(launcher: str) -> dict[int, dict]:
    root = tempfile.mkdtemp(prefix=f"dist_share_{launcher}_")
    out = os.path.join(root, "result")
    runs, checks = LAUNCHES[launcher]
    args = ["--runs", runs, "--out", out, "--steps", "5", "--batch", "8", "--eval"]
    if checks:
        args += ["--checks", checks]
    if "records" in checks.split(","):
        from tests.workers.records_shards import write_shard_sets

        args += ["--shards", ",".join(write_shard_sets(os.path.join(root, "shards")))]
    if launcher == "local":
        processes.run_job([*WORKER, "--strategy", "local", *args], TIMEOUT, cwd=ROOT).check()
        ranks = 1
    elif launcher == "mirrored":
        cmd = [*WORKER, "--strategy", "mirrored", "--num-cpu-devices", "2", "--ids", *args]
        processes.run_job(cmd, TIMEOUT, cwd=ROOT).check()
        ranks = 1
    elif launcher == "horovod_gloo":
        cmd = processes.local_horovodrun_command(
            2, [*WORKER, "--strategy", "horovod", "--ids", *args]
        )
        processes.run_job(cmd, TIMEOUT, cwd=ROOT).check()
        ranks = 2
    elif launcher == "horovod_mpirun":
        cmd = processes.local_mpirun_command(2, [*WORKER, "--strategy", "horovod", *args])
        processes.run_job(cmd, TIMEOUT, cwd=ROOT).check()
        ranks = 2
    elif launcher == "multiworker":
        cmd = [*WORKER, "--strategy", "multiworker", "--ids", *args]
        for r in processes.run_local_multiworker(2, cmd, TIMEOUT, cwd=ROOT):
            r.check()
        ranks = 2
    else:
        raise ValueError(launcher)
    return {r: json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)}


def check(launcher: str, name: str) -> list[dict]:
    """The result of check `name` in `launcher`'s launch, one per rank (rank order); fails
    with the worker's traceback if the check raised on any rank."""
    results = run(launcher)
    out = []
    for rank in sorted(results):
        assert name in results[rank]["checks"], f"{launcher} ran no check {name!r}"
        value = results[rank]["checks"][name]
        assert "error" not in value, f"{launcher} rank {rank}, check {name}:\n{value['error']}"
        out.append(value)
    return out
