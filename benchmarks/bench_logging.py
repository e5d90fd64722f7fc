"""Logging cost: step time with TensorBoard and every signal on, and inside and outside a profiler window.

One worker job per strategy (benchmarks/workers/logging_cost.py) trains the same config as
``off`` (metrics.jsonl only, no clock read in the step), ``on`` (the defaults with TensorBoard:
scalars every 50 steps, HParams, the step's graph, gradient norm, each rank's own step time)
and ``profiled`` (``on`` with a ``training.profile`` window), in rounds. The ratios are per
round, of median window times; the table gives the median over rounds. Target: on/off >= 0.98.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "logging"


def _round(windows: dict[str, list[float]], block: int, warmup: int, window: list[int]) -> dict:
    """One round's ratios (throughput: > 1 is faster) from its runs' window seconds.

    Window i holds steps i * block + 1 ... (i + 1) * block and whatever the loop did before
    them: the profiler starts in the window before its first step's and stops (writing the
    trace) in the one that holds its last step.
    """
    start, end = window
    first, last = start // block, end // block
    off, on = windows["off"][warmup:], windows["on"][warmup:]
    profiled = windows["profiled"]
    inside, outside = profiled[first : last - 1], profiled[last:]
    return {
        "on_over_off": median(off) / median(on),
        "profiled_outside_over_on": median(on[last - warmup :]) / median(outside),
        "profiled_inside_over_on": median(on) / median(inside),
        "ms_per_step_off": 1e3 * median(off) / block,
        "ms_per_step_on": 1e3 * median(on) / block,
        "ms_per_step_in_window": 1e3 * median(inside) / block,
        "start_and_stop_s": profiled[first - 1] + profiled[last - 1] - 2 * median(outside),
    }


def _case(strategy: str, args: list[str], timeout: float, intra: int | None) -> dict[str, Any]:
    launch, n = ("horovodrun", 2) if strategy == "horovod" else ("single", 1)
    argv = ["--strategy", strategy, *args]
    if intra:
        argv += ["--intra", str(intra), "--inter", str(intra)]
    results = run_worker("logging_cost", argv, timeout, launch, n, worker_python_env(intra, intra))
    chief = next(r for r in results if r["rank"] == 0)
    block, warmup = chief["block_steps"], chief["warmup_blocks"]
    rounds = [_round(w["wall"], block, warmup, chief["profile_window"]) for w in chief["rounds"]]
    cpu = [_round(w["cpu"], block, warmup, chief["profile_window"]) for w in chief["rounds"]]
    row: dict[str, Any] = {"case": f"{strategy} x{chief['world_size']}", "rounds": len(rounds)}
    for key in rounds[0]:
        row[key] = statistics.median(r[key] for r in rounds)
    row["on_over_off_min"] = min(r["on_over_off"] for r in rounds)
    row["cpu_on_over_off"] = statistics.median(r["on_over_off"] for r in cpu)
    row["cpu_profiled_inside_over_on"] = statistics.median(
        r["profiled_inside_over_on"] for r in cpu
    )
    row["raw"] = chief
    return row


def run(quick: bool = False) -> dict:
    if quick:
        cases = [("local", None)]
        block, repeats, warmup, rounds, window, timeout = 5, 5, 1, 1, (10, 15), 300
    else:
        cases = [("local", None), ("horovod", 1)]
        block, repeats, warmup, rounds, window, timeout = 50, 7, 1, 6, (100, 150), 1200
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
            "The project's siamese config (conv2d tower, global batch 64), each variant a fresh "
            f"Trainer, timed in windows of {block} steps ({warmup} warm-up window dropped), "
            f"{rounds} round(s) alternating the variants' order; ratios per round of median "
            "window times, median over rounds. off: metrics.jsonl only, TensorBoard off, no "
            "clock in the step; on: the defaults with TensorBoard (log_every 50: scalars, "
            "HParams, the step's graph, gradient norm, each rank's own step time); profiled: on "
            f"with training.profile steps {window[0] + 1}-{window[0] + window[1]}. "
            "on_over_off: throughput with everything on over off (target >= 0.98); "
            "profiled_outside_over_on: after the window, against on (1.0: no cost outside it); "
            "profiled_inside_over_on: inside the window; start_and_stop_s: starting the "
            "profiler and writing its trace; cpu_*: the same ratios of this process's CPU time "
            "(less disturbed by other work on the cores). horovod: horovodrun -np 2 (Gloo), 1 intra-op "
            "thread per process."
        ),
        "params": {"block_steps": block, "repeats": repeats, "warmup_blocks": warmup},
        "cases": rows,
        "table": table,
        "plot": {
            "y": ["on_over_off", "profiled_outside_over_on", "profiled_inside_over_on"],
            "title": "Throughput relative to the baseline",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
