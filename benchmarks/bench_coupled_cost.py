"""The cost of exactness across replicas at 2 processes: global negatives, synchronised batch norm.

Under ``horovodrun -np 2`` (Gloo) and 2 multi-worker processes (TF_CONFIG), each process with
1 intra- and 1 inter-op thread (one core of the two), workers/coupled_cost.py times
dist_share's compiled step with an exact batch-coupled option and with its per-replica
counterpart, built from the same config in the same process, in interleaved blocks:

* ``negatives: global`` vs ``local`` on the two-tower config with ``in_batch_softmax``;
* synchronised vs per-replica batch norm (``norm_sync``) on the default config
  (configs/siamese_digits.yaml, ``norm: batch``), and on the MobileNet config (Horovod only;
  its converted BatchNormalization layers are switched in place).

Beside the added time per step: the collectives each option adds, counted from the code
(the loss's ``gather_rows``: 2 forward, the row counts then the rows, and 1 backward, a sum;
a synchronised batch norm: 1 ``all_sum`` forward and 1 backward per layer, whatever the
number of folded streams) and counted in the traced step's graph, and the time of one
dependent collective on this machine for the same launcher (a chain of ``all_sum`` calls,
see the worker), so that (added collectives) x (latency) predicts the added time.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "coupled_cost"
# Collectives the exact option adds per step, counted from dist_share/model/: the loss's one
# gather_rows (row counts + rows forward, a sum backward; the in_batch_top1 metric gathers
# on both sides alike), and per synchronised batch-norm layer one all_sum each way.
NEGATIVES_ADDED = 3
BATCH_NORM_ADDED_PER_LAYER = 2
OPTIONS = {
    "negatives": "negatives global vs local",
    "batchnorm": "batch norm sync vs per-replica",
    "mobilenet": "MobileNet batch norm sync vs per-replica",
}
# (case, launch, strategy, pairs, probe, block steps, repeats). The MobileNet pair runs in its
# own job: its step is ~10x longer and a failure there must not cost the other numbers.
JOBS = [
    ("horovod gloo x2", "horovodrun", "horovod", "negatives,batchnorm", True, 25, 10),
    ("multiworker x2", "multiworker", "multiworker", "negatives,batchnorm", True, 25, 10),
    ("horovod gloo x2", "horovodrun", "horovod", "mobilenet", False, 5, 6),
]


def _code_count(pair: dict[str, Any]) -> int:
    if pair["pair"] == "negatives":
        return NEGATIVES_ADDED
    return BATCH_NORM_ADDED_PER_LAYER * pair["exact"]["synchronised_batch_norms"]


def _predicted(pair: dict[str, Any], probe: dict[str, Any] | None) -> float | None:
    """Seconds the option should add: its dependent collectives, each at the probed time."""
    if not probe:
        return None
    if pair["pair"] == "negatives":  # the loss's gather_rows forward, its sum backward
        return probe["gather_rows"]["seconds"] + probe["all_sum"]["seconds"]
    return _code_count(pair) * probe["all_sum"]["seconds"]


def run(quick: bool = False) -> dict:
    if quick:  # one Horovod job, a few steps: proves the harness, no timing claims
        jobs = [(*JOBS[0][:4], True, 3, 1)]
        warmup, chains, probe_repeats, timeout = 1, "2,4", 2, 300
    else:
        jobs, warmup, chains, probe_repeats, timeout = JOBS, 1, "4,24", 15, 900
    results = []
    for case, launch, strategy, pairs, probe, block, repeats in jobs:
        args = [
            "--strategy", strategy, "--pairs", pairs, "--block", str(block),
            "--repeats", str(repeats), "--warmup", str(warmup), "--intra", "1", "--inter", "1",
            "--chains", chains, "--probe-repeats", str(probe_repeats),
        ]  # fmt: skip
        if probe:
            args.append("--probe")
        out = run_worker("coupled_cost", args, timeout, launch, 2, worker_python_env(1, 1))
        results.append((case, next(r for r in out if r["rank"] == 0)))
    latency = {case: r["probe"] for case, r in results if r["probe"]}
    table = []
    for case, r in results:
        for pair in r["pairs"]:
            exact, relaxed = pair["exact"], pair["per_replica"]
            exact_s, relaxed_s = median(exact["step_s"]), median(relaxed["step_s"])
            added = exact_s - relaxed_s
            predicted = _predicted(pair, latency.get(case))
            cpu = median(exact["cpu_s_per_step"]) - median(relaxed["cpu_s_per_step"])
            table.append(
                {
                    "case": case,
                    "option": OPTIONS[pair["pair"]],
                    "global_batch": pair["global_batch"],
                    "exact_ms": 1e3 * exact_s,
                    "per_replica_ms": 1e3 * relaxed_s,
                    "ratio": exact_s / relaxed_s,
                    "added_ms": 1e3 * added,
                    "added_collectives_code": _code_count(pair),
                    "added_collective_ops_graph": (
                        exact["collective_ops"] - relaxed["collective_ops"]
                    ),
                    "predicted_added_ms": 1e3 * predicted if predicted is not None else None,
                    "measured_over_predicted": added / predicted if predicted else None,
                    "added_cpu_ms": 1e3 * cpu,
                }
            )
    probe_rows = [
        {
            "case": case,
            "collective": kind,
            "bytes": p["bytes"],
            "ms_per_call": 1e3 * p["seconds"],
            **{f"chain_{k}_ms": 1e3 * v for k, v in p["chain_s"].items()},
        }
        for case, probes in latency.items()
        for kind, p in probes.items()
    ]
    return {
        "name": NAME,
        "description": (
            "2 processes on this machine, 1 intra- + 1 inter-op thread each; dist_share's "
            "compiled step (CustomLoop.train_step, one step per call), exact and per-replica "
            "sides interleaved in blocks of "
            + ", ".join(sorted({f"{j[5]} steps ({j[3]}) x {j[6]}" for j in jobs}))
            + f", after {warmup} warm-up block(s) each, median of the blocks. "
            "ratio = exact / per-replica step time. added_collectives_code: from the code "
            "(gather_rows 2 forward + 1 backward; synchronised batch norm 1 + 1 per layer); "
            "added_collective_ops_graph: the difference of the collective ops in the two "
            "traced steps, before Grappler (MultiWorkerMirrored's all_gather is two ops: "
            "shapes, then data). predicted_added_ms: the option's dependent collectives at "
            "the times probed for the same launcher (table below: chains of "
            + " and ".join(chains.split(","))
            + " calls): negatives one gather_rows + one all_sum, batch norm 2 all_sum per "
            "layer; the MobileNet row uses the first Horovod job's probe. added_cpu_ms: the "
            "same difference in process CPU time."
        ),
        "params": {
            "jobs": [list(j) for j in jobs],
            "warmup_blocks": warmup,
            "probe_chains": chains,
            "probe_repeats": probe_repeats,
            "threads": {"intra_op": 1, "inter_op": 1},
        },
        "raw": [{"case": case, **r} for case, r in results],
        "table": table,
        "extra_tables": {"One dependent collective (cross_replica, 2 processes)": probe_rows},
        "plot": {"y": ["ratio"], "title": "step time, exact / per-replica (2 processes)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
