"""The step-time cost of the metric-learning objectives at 2 processes: mining and corrections.

Under ``horovodrun -np 2`` (Gloo), each process with 1 intra- and 1 inter-op thread (one core of
the two), workers/coupled_cost.py times dist_share's compiled step with an option and without
it, built from the same config in the same process, in interleaved blocks:

* ``mining: batch_hard`` / ``semi_hard`` over the global batch vs each replica mining its own
  rows (configs/triplet_digits_mined.yaml, global batch 64 and 1024);
* ``remove_accidental_hits``, ``logq_correction`` and both vs the plain in-batch softmax over
  the global batch (configs/two_tower_synthetic.yaml with ``in_batch_softmax``, global batch
  128 and 8192, and 4096 with towers of 2 x 512 units).

Beside the added time per step: the collective ops each option adds in the traced step's graph,
and the time of one dependent collective on this machine (the worker's probe: a chain of
``all_sum`` calls), so that (added collectives) x (latency) predicts the added time; what
remains is the option's own computation (the distance matrix and its sort, the id masks, the
frequency estimate's scatter updates).
"""

from __future__ import annotations

import sys

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "objective_cost"
OPTIONS = {
    "batch_hard": "batch_hard mining, global vs per-replica",
    "semi_hard": "semi_hard mining, global vs per-replica",
    "batch_hard_large": "batch_hard mining, global vs per-replica",
    "hits": "remove_accidental_hits vs plain",
    "logq": "logq_correction vs plain",
    "corrections": "both corrections vs plain",
    "corrections_large": "both corrections vs plain",
    "corrections_wide": "both corrections vs plain, towers of 2 x 512 units",
}
# (pairs, block steps, repeats): the small steps first (with the latency probe), then the two
# large ones (~10x longer steps) in their own job.
JOBS = [
    ("batch_hard,semi_hard,hits,logq,corrections", True, 25, 10),
    ("batch_hard_large,corrections_large,corrections_wide", False, 4, 6),
]


def run(quick: bool = False) -> dict:
    if quick:  # one job, a few steps: proves the harness, no timing claims
        jobs = [("batch_hard,corrections", True, 3, 1)]
        warmup, chains, probe_repeats, timeout = 1, "2,4", 2, 300
    else:
        jobs, warmup, chains, probe_repeats, timeout = JOBS, 1, "4,24", 15, 900
    results = []
    for pairs, probe, block, repeats in jobs:
        args = [
            "--strategy", "horovod", "--pairs", pairs, "--block", str(block),
            "--repeats", str(repeats), "--warmup", str(warmup), "--intra", "1", "--inter", "1",
            "--chains", chains, "--probe-repeats", str(probe_repeats),
        ]  # fmt: skip
        if probe:
            args.append("--probe")
        out = run_worker("coupled_cost", args, timeout, "horovodrun", 2, worker_python_env(1, 1))
        results.append(next(r for r in out if r["rank"] == 0))
    latency = next(r["probe"] for r in results if r["probe"])
    one = latency["all_sum"]["seconds"]
    table = []
    for r in results:
        for pair in r["pairs"]:
            exact, relaxed = pair["exact"], pair["per_replica"]
            with_s, without_s = median(exact["step_s"]), median(relaxed["step_s"])
            added = with_s - without_s
            collectives = exact["collective_ops"] - relaxed["collective_ops"]
            predicted = collectives * one
            table.append(
                {
                    "option": OPTIONS[pair["pair"]],
                    "global_batch": pair["global_batch"],
                    "with_ms": 1e3 * with_s,
                    "without_ms": 1e3 * without_s,
                    "ratio": with_s / without_s,
                    "added_ms": 1e3 * added,
                    "added_collective_ops_graph": collectives,
                    "predicted_added_ms": 1e3 * predicted,
                    "measured_over_predicted": added / predicted if predicted else None,
                    "added_cpu_ms": 1e3
                    * (median(exact["cpu_s_per_step"]) - median(relaxed["cpu_s_per_step"])),
                }
            )
    return {
        "name": NAME,
        "description": (
            "horovodrun -np 2 (Gloo) on this machine, 1 intra- + 1 inter-op thread per "
            "process; dist_share's compiled step (CustomLoop.train_step, one step per call), "
            "the sides interleaved in blocks of "
            + ", ".join(f"{j[2]} steps ({j[0]}) x {j[3]}" for j in jobs)
            + f", after {warmup} warm-up block(s) each, median of the blocks. ratio = with / "
            "without the option. added_collective_ops_graph: the difference of the collective "
            "ops in the two traced steps. predicted_added_ms: those collectives, each at the "
            f"time of one dependent all_sum ({1e3 * one:.3f} ms, chains of "
            + " and ".join(chains.split(","))
            + " calls). added_cpu_ms: the same difference in process CPU time."
        ),
        "params": {
            "jobs": [list(j) for j in jobs],
            "warmup_blocks": warmup,
            "probe_chains": chains,
            "probe_repeats": probe_repeats,
            "threads": {"intra_op": 1, "inter_op": 1},
        },
        "raw": results,
        "probe": latency,
        "table": table,
        "plot": {"y": ["ratio"], "title": "step time, with / without the option (2 processes)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
