"""How long a job takes to end when a rank dies or freezes, and what a restart loses.

    python -m benchmarks.fault_times                       # every launcher, SIGKILL and SIGSTOP
    python -m benchmarks.fault_times --launchers multiworker --faults SIGSTOP --rank 0
    python -m benchmarks.fault_times --restart            # steps lost on a --max-restarts restart
    python -m benchmarks.fault_times --preempt            # SIGTERM: where it stops, time to save

Each case starts a real 2-process ``dist-share launch`` job of the small siamese config
(tests/helpers/fault_jobs.py), waits until step 6 is logged, sends the signal to one rank (found
through its heartbeat file) and times, with the monotonic clock of this process, how long the
launcher takes to exit. Times include the launcher's tear-down. The machine's load changes them;
the point is the bound (``training.stall_timeout`` plus tear-down), not the decimals.
Not part of ``benchmarks.run_all``: it measures failure handling, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import fault_jobs


def kill_case(launcher: str, fault: str, rank: int, stall_timeout: float) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fault_{launcher}_")) / "run"
    run_dir.parent.mkdir(exist_ok=True)
    args = ["--steps", "100000", "--set", "checkpoint.every=5",
            "--set", f"training.stall_timeout={stall_timeout}"]  # fmt: skip
    job = fault_jobs.Job(launcher, run_dir, args)
    try:
        job.wait_for_step(6)
        time.sleep(1.5)
        pid = job.rank_pid(rank)
        os.kill(pid, getattr(signal, fault))
        t0 = time.monotonic()
        code = job.wait()
        elapsed = time.monotonic() - t0
    finally:
        job.close()
    return {
        "launcher": launcher,
        "fault": fault,
        "rank": rank,
        "stall_timeout_s": stall_timeout,
        "exit_code": code,
        "seconds_to_exit": round(elapsed, 1),
        "processes_left": len(job.leftovers()),
    }


def restart_case(every: int) -> dict[str, Any]:
    """Multi-worker, --max-restarts 1, SIGKILL of worker 1: steps redone and time to recover."""
    run_dir = Path(tempfile.mkdtemp(prefix="fault_restart_")) / "run"
    args = ["--steps", "100000", "--set", f"checkpoint.every={every}"]
    job = fault_jobs.Job("multiworker", run_dir, args, ["--max-restarts", "1"])
    try:
        logged = job.wait_for_step(every + every // 2)
        import tensorflow as tf

        saved = int(tf.train.latest_checkpoint(str(run_dir / "checkpoints")).rsplit("-", 1)[1])
        logged = job.steps()[-1]
        os.kill(job.rank_pid(1), signal.SIGKILL)
        t0 = time.monotonic()
        # Recovered when the relaunched job (which first drops the log lines past its
        # checkpoint) logs a step after the checkpoint again.
        truncated = False
        while True:
            steps = job.steps()
            truncated = truncated or (bool(steps) and steps[-1] <= saved)
            if truncated and steps and steps[-1] > saved:
                break
            if time.monotonic() - t0 > fault_jobs.TIMEOUT or job.proc.poll() is not None:
                raise RuntimeError(f"no recovery:\n{job.output()}")
            time.sleep(0.1)
        recovered = time.monotonic() - t0
    finally:
        job.close()
    return {
        "case": "multiworker --max-restarts 1, SIGKILL worker 1",
        "checkpoint_every": every,
        "last_step_logged_before_kill": logged,
        "checkpoint_step": saved,
        "steps_redone": logged - saved,
        "seconds_kill_to_first_new_step": round(recovered, 1),
    }


def preempt_case() -> dict[str, Any]:
    """Multi-worker, SIGTERM to worker 1 after step 5: the step all stopped at, the save time."""
    run_dir = Path(tempfile.mkdtemp(prefix="fault_preempt_")) / "run"
    job = fault_jobs.Job(
        "multiworker", run_dir, ["--steps", "400", "--set", "checkpoint.every=100"]
    )
    try:
        job.wait_for_step(5)
        os.kill(job.rank_pid(1), signal.SIGTERM)
        t0 = time.monotonic()
        code = job.wait()
        elapsed = time.monotonic() - t0
    finally:
        job.close()
    message = next(x for x in job.output().splitlines() if "after the signal" in x)
    return {
        "case": "multiworker x2, SIGTERM to worker 1",
        "exit_code": code,
        "message": message,
        "seconds_signal_to_launcher_exit": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launchers", default="horovodrun,mpirun,multiworker")
    p.add_argument("--faults", default="SIGKILL,SIGSTOP")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--stall-timeout", type=float, default=20.0)
    p.add_argument("--restart", action="store_true", help="measure a --max-restarts restart only")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--preempt", action="store_true", help="measure a preemption only")
    a = p.parse_args(argv)
    rows = []
    if a.restart:
        rows.append(restart_case(a.checkpoint_every))
    elif a.preempt:
        rows.append(preempt_case())
    else:
        for launcher in a.launchers.split(","):
            for fault in a.faults.split(","):
                rows.append(kill_case(launcher, fault, a.rank, a.stall_timeout))
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
