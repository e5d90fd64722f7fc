"""Logging cost: the Trainer with all of its logging on against bare steps, and inside and outside a profiler window.

One worker job per strategy (benchmarks/workers/logging_cost.py) trains the config through the
Trainer's whole loop with everything on (``on``: TensorBoard scalars every 50 steps, HParams,
the step's graph, gradient norm, each rank's own step time, metrics.jsonl), and with a
``training.profile`` window as well (``profiled``), each window of steps followed by a block of
bare compiled steps of the same model (no clock in the step, nothing logged) in the same
process. Ratios are per adjacent pair (bare over full: throughput, < 1 is a cost), median over
pairs. Target: on >= 0.98.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "logging"


def _pairs(run: dict, key: str, windows: range) -> list[float]:
    """Throughput ratios full / bare of the windows given, each against the bare block after it."""
    full, bare = run[key], run[f"bare_{key}"]
    return [bare[i] / full[i] for i in windows if i < len(full) and i < len(bare)]


def _case(strategy: str, args: list[str], timeout: float, intra: int | None) -> dict[str, Any]:
    launch, n = ("horovodrun", 2) if strategy == "horovod" else ("single", 1)
    argv = ["--strategy", strategy, *args]
    if intra:
        argv += ["--intra", str(intra), "--inter", str(intra)]
    results = run_worker("logging_cost", argv, timeout, launch, n, worker_python_env(intra, intra))
    chief = next(r for r in results if r["rank"] == 0)
    block, warmup = chief["block_steps"], chief["warmup_blocks"]
    start, end = chief["profile_window"]
    # Window i holds steps i * block + 1 ... (i + 1) * block and what the loop did before them:
    # the profiler starts in the window before its first step's, and stops (writing the trace)
    # in the one holding its last step.
    first, last = start // block, end // block
    on = [r for r in chief["runs"] if r["variant"] == "on"]
    profiled = [r for r in chief["runs"] if r["variant"] == "profiled"]
    count = len(on[0]["wall"])
    row: dict[str, Any] = {"case": f"{strategy} x{chief['world_size']}"}
    for key, prefix in (("wall", ""), ("cpu", "cpu_")):
        every = [x for r in on for x in _pairs(r, key, range(warmup, count))]
        inside = [x for r in profiled for x in _pairs(r, key, range(first, last - 1))]
        after = [x for r in profiled for x in _pairs(r, key, range(last, count))]
        row[f"{prefix}on_over_bare"] = median(every)
        row[f"{prefix}profiled_inside_over_bare"] = median(inside)
        row[f"{prefix}profiled_after_over_bare"] = median(after)
        if not prefix:
            row["pairs"] = len(every)
            row["on_min"], row["on_max"] = min(every), max(every)
    bare_ms = [1e3 * x / block for r in on for x in r["bare_wall"][warmup:]]
    row["ms_per_step_bare"] = median(bare_ms)
    row["start_and_stop_s"] = median(
        [
            r["wall"][first - 1] + r["wall"][last - 1] - 2 * median(r["wall"][last:])
            for r in profiled
        ]
    )
    row["raw"] = chief
    return row


def run(quick: bool = False) -> dict:
    if quick:
        cases = [("local", None)]
        block, repeats, warmup, rounds, window, timeout = 5, 6, 1, 1, (10, 15), 300
    else:
        cases = [("local", None), ("horovod", 1)]
        block, repeats, warmup, rounds, window, timeout = 50, 9, 1, 2, (100, 150), 1500
    args = [
        "--block", str(block), "--repeats", str(repeats), "--warmup", str(warmup),
        "--rounds", str(rounds), "--profile-start", str(window[0]),
        "--profile-steps", str(window[1]),
    ]  # fmt: skip
    rows = [_case(strategy, args, timeout, intra) for strategy, intra in cases]
    table = [{k: v for k, v in r.items() if k != "raw"} for r in rows]
    return {
        "name": NAME,
        "description": (
            "The project's siamese config (conv2d tower, global batch 64). The Trainer's whole "
            f"loop in windows of {block} steps ({warmup} warm-up window dropped), each followed "
            "by a block of bare compiled steps of the same model in the same process (no clock "
            "read in the step, nothing logged, no TensorBoard); "
            f"{rounds} run(s) of each variant. on: the defaults with TensorBoard (log_every 50: "
            "scalars, HParams, the step's graph, gradient norm, each rank's own step time, "
            "metrics.jsonl); profiled: on with training.profile steps "
            f"{window[0] + 1}-{window[0] + window[1]}. *_over_bare: median over pairs of the "
            "throughput ratio full loop / bare steps (target for on: >= 0.98); "
            "profiled_inside: the windows inside the profiler's, profiled_after: those after "
            "it; start_and_stop_s: starting the profiler and writing its trace; cpu_*: the same "
            "of this process's CPU time. horovod: horovodrun -np 2 (Gloo), 1 intra-op thread "
            "per process."
        ),
        "params": {"block_steps": block, "repeats": repeats, "warmup_blocks": warmup},
        "cases": rows,
        "table": table,
        "plot": {
            "y": ["on_over_bare", "profiled_inside_over_bare", "profiled_after_over_bare"],
            "title": "Throughput of the full loop over bare steps",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
