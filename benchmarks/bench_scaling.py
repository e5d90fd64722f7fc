"""Scaling on this machine: 1 vs 2 replicas under every launcher dist_share supports.

Weak scaling (the per-replica batch is fixed, so 2 replicas train a global batch twice as big),
dist_share's Trainer in every case, started through tests/helpers/processes.py with a timeout.

Threads, on a 2-core machine: a 2-process job gets 1 intra-op + 1 inter-op thread per process
(one core each; more would just oversubscribe the cores and make the processes fight; the
Gloo job is also run with 2 threads each to show it). The
single-process baseline is measured twice: with 1 thread (the same resources as *one* of the
two workers: efficiency = rate(2 workers) / (2 x rate(1 worker, 1 thread)), the classic
per-worker scaling efficiency) and with 2 threads (the whole machine for one process: speedup =
rate(2 workers) / rate(1 worker, 2 threads), what a user of this machine actually gains).
MirroredStrategy runs its 2 replicas in one process on TF's default thread pools.

Jobs cannot be interleaved like the in-process benchmarks, so the whole list of cases is run
`rounds` times in order and each case's rate is the median over its rounds' windows.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "scaling"

# (case name, strategy, launch, processes, threads per process (None: TF default), devices,
# mpi_yield). Open MPI's progress engine busy-polls while a rank waits in a collective; with 2
# ranks on 2 cores (plus anything else running) the spinning rank steals the core its peer
# needs. The framework's mpirun lines always pass mpi_yield_when_idle; "horovod mpirun x2"
# leaves it out on purpose (mpi_yield False) to show what it is worth.
CASES = [
    ("1 worker, 2 threads", "local", "single", 1, 2, None, True),
    ("1 worker, 1 thread", "local", "single", 1, 1, None, True),
    ("horovod gloo x2", "horovod", "horovodrun", 2, 1, None, True),
    ("horovod gloo x2, 2 threads each", "horovod", "horovodrun", 2, 2, None, True),
    ("horovod mpirun x2", "horovod", "mpirun", 2, 1, None, False),
    ("horovod mpirun x2, yield_when_idle", "horovod", "mpirun", 2, 1, None, True),
    ("mirrored 2 CPU devices", "mirrored", "single", 1, None, 2, True),
    ("multiworker x2", "multiworker", "multiworker", 2, 1, None, True),
]
QUICK_CASES = ["horovod gloo x2"]  # proves the multi-process path; no timing claims


def _run_case(
    case: tuple, per_replica_batch: int, block: int, repeats: int, warmup: int, timeout: float
) -> dict[str, Any]:
    name, strategy, launch, nproc, threads, devices, mpi_yield = case
    args = [
        "--strategy", strategy, "--per-replica-batch", str(per_replica_batch),
        "--block", str(block), "--repeats", str(repeats), "--warmup", str(warmup),
    ]  # fmt: skip
    if threads:
        args += ["--intra", str(threads), "--inter", str(threads)]
    if devices:
        args += ["--devices", str(devices)]
    env = worker_python_env(threads, threads)
    results = run_worker("scaling", args, timeout, launch, nproc, env, mpi_yield=mpi_yield)
    return next(r for r in results if r["rank"] == 0)


def run(quick: bool = False) -> dict:
    if quick:
        cases = [c for c in CASES if c[0] in QUICK_CASES]
        per_replica_batch, block, repeats, warmup, rounds, timeout = 64, 5, 2, 1, 1, 150
    else:
        cases = CASES
        per_replica_batch, block, repeats, warmup, rounds, timeout = 256, 20, 6, 1, 2, 600
    rates: dict[str, list[float]] = {c[0]: [] for c in cases}
    info: dict[str, dict] = {}
    for _ in range(rounds):
        for case in cases:
            r = _run_case(case, per_replica_batch, block, repeats, warmup, timeout)
            rates[case[0]].extend(r["examples_per_sec"])
            info[case[0]] = r
    base1 = median(rates["1 worker, 1 thread"]) if "1 worker, 1 thread" in rates else None
    base2 = median(rates["1 worker, 2 threads"]) if "1 worker, 2 threads" in rates else None
    table = []
    for name, _strategy, launch, nproc, threads, _devices, _yield in cases:
        r = info[name]
        rate = median(rates[name])
        replicas = r["replicas"]
        table.append(
            {
                "case": name,
                "launcher": launch,
                "processes": nproc,
                "replicas": replicas,
                "threads_per_process": threads or "default",
                "global_batch": r["global_batch"],
                "examples_per_s": rate,
                "efficiency_vs_1w1t": rate / (replicas * base1) if base1 else None,
                "speedup_vs_1w2t": rate / base2 if base2 else None,
                "comm_bytes_per_step": r["comm_bytes_per_step"],
            }
        )
    return {
        "name": NAME,
        "description": (
            "dist_share Trainer, siamese conv2d model (project defaults), per-replica batch "
            f"{per_replica_batch}, windows of {block} steps, {warmup} warm-up window(s) dropped, "
            f"{repeats} windows x {rounds} round(s) per case, median. efficiency_vs_1w1t = "
            "rate / (replicas x rate(1 worker, 1 thread)); speedup_vs_1w2t = rate / rate(1 "
            "worker, 2 threads)."
        ),
        "params": {
            "per_replica_batch": per_replica_batch,
            "block_steps": block,
            "repeats": repeats,
            "warmup": warmup,
            "rounds": rounds,
        },
        "rates": rates,
        "table": table,
        "plot": {"y": ["examples_per_s"], "title": "examples/s, 1 vs 2 replicas (2 cores)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
