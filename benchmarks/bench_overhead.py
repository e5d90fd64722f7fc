"""Overhead: dist_share's Trainer vs a hand-written loop training the same model.

For each case one worker job (benchmarks/workers/overhead.py) trains the same config twice in
the same process(es), interleaving timed blocks of Trainer steps with blocks of a plain loop
(local: ``tf.function`` + ``GradientTape``; Horovod: the loop of Horovod's TF2 examples). The
ratio trainer/plain is taken per pair of adjacent blocks, then the median over pairs, so slow
drifts of the machine load cancel. Warm-up blocks (tracing) are excluded.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker, worker_python_env

NAME = "overhead"


def _cases(
    strategy: str,
    variants: list[str],
    batch: int,
    block: int,
    repeats: int,
    warmup: int,
    intra: int | None,
    timeout: float,
) -> list[dict[str, Any]]:
    """One worker job (one TensorFlow start-up) for all `variants` of one strategy and batch."""
    args = [
        "--strategy", strategy, "--variant", ",".join(variants), "--batch", str(batch),
        "--block", str(block), "--repeats", str(repeats), "--warmup", str(warmup),
    ]  # fmt: skip
    if intra:
        args += ["--intra", str(intra), "--inter", str(intra)]
    launch, n = ("horovodrun", 2) if strategy == "horovod" else ("single", 1)
    results = run_worker("overhead", args, timeout, launch, n, worker_python_env(intra, intra))
    return [
        _row(next(r for r in results if r["rank"] == 0 and r["variant"] == v)) for v in variants
    ]


def _row(r0: dict[str, Any]) -> dict[str, Any]:
    strategy, variant, batch = r0["strategy"], r0["variant"], r0["global_batch"]
    intra = r0["threads"]["intra_op"]
    trainer, plain = r0["trainer_examples_per_sec"], r0["plain_examples_per_sec"]
    ratios = [t / p for t, p in zip(trainer, plain, strict=True)]
    cpu = [
        t / p
        for t, p in zip(r0["trainer_cpu_ms_per_step"], r0["plain_cpu_ms_per_step"], strict=True)
    ]
    return {
        "case": f"{strategy} x{r0['world_size']} {variant}",
        "strategy": strategy,
        "processes": r0["world_size"],
        "variant": variant,
        "global_batch": batch,
        "intra_op_threads": intra,
        "trainer_ex_per_s": median(trainer),
        "plain_ex_per_s": median(plain),
        "trainer_over_plain": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": len(ratios),
        "cpu_per_step_trainer_over_plain": median(cpu),
        "raw": r0,
    }


def _breakdown(batch: int, block: int, repeats: int, timeout: float) -> dict[str, Any]:
    """Stage-by-stage cost of the Trainer's step (benchmarks/workers/overhead_breakdown.py)."""
    args = ["--batch", str(batch), "--block", str(block), "--repeats", str(repeats)]
    (r,) = run_worker("overhead_breakdown", args, timeout, env=worker_python_env())
    wall, cpu = r["wall_ms_per_step"], r["cpu_ms_per_step"]
    base_wall, base_cpu = median(wall["plain"]), median(cpu["plain"])
    table = [
        {
            "stage": name,
            "wall_ms": median(wall[name]),
            "wall_vs_plain": median(wall[name]) / base_wall,
            "cpu_ms": median(cpu[name]),
            "cpu_vs_plain": median(cpu[name]) / base_cpu,
        }
        for name in wall
    ]
    return {"table": table, "graph_ops": r["graph_ops"], "raw": r}


# (what, case, target): the Trainer's targets, each read from one row of the table.
TARGETS = [
    ("Trainer, all defaults, batch 64 / hand loop", "local x1 default", 0.98),
    ("Trainer, defaults + steps_per_loop=10 / hand loop", "local x1 default_spl10", 1.0),
    ("Trainer under MirroredStrategy / hand MirroredStrategy loop", "mirrored x1 quiet", None),
]


def _targets(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets beside their figures, and Keras fit vs the custom loop (both rows measured
    against the same hand loop in the same process, so their ratio compares the two loops)."""
    by_case = {r["case"]: r for r in table if r["global_batch"] == 64}
    out = []
    for what, case, target in TARGETS:
        if case in by_case:
            ratio = by_case[case]["trainer_over_plain"]
            met = None if target is None else ratio >= target
            out.append({"what": what, "ratio": ratio, "target": target, "met": met})
    if "local x1 fit" in by_case and "local x1 quiet" in by_case:
        fit = by_case["local x1 fit"]["trainer_over_plain"]
        custom = by_case["local x1 quiet"]["trainer_over_plain"]
        out.append(
            {
                "what": "Keras fit loop / custom loop",
                "ratio": fit / custom,
                "target": None,
                "met": None,
            }
        )
    return out


def run(quick: bool = False) -> dict:
    if quick:
        jobs = [("local", ["quiet"], 64, None)]
        block, repeats, warmup, timeout = 5, 2, 1, 120
    else:
        # One job per strategy and batch; its variants share the job's TensorFlow start-up.
        jobs = [
            ("local", ["quiet", "default", "default_spl10", "fit"], 64, None),
            ("mirrored", ["quiet"], 64, None),
            ("local", ["quiet"], 512, None),
            ("horovod", ["quiet", "default"], 128, 1),
        ]
        block, repeats, warmup, timeout = 20, 30, 2, 900
    # The breakdown first (and in quick mode too, at tiny sizes): it drives the Trainer's
    # compiled step directly, so a change of that step's signature fails here at once, not in
    # the next full run after the long cases.
    breakdown = _breakdown(batch=64, block=block, repeats=repeats, timeout=timeout)
    rows = [
        row for s, vs, b, t in jobs for row in _cases(s, vs, b, block, repeats, warmup, t, timeout)
    ]
    table = [{k: v for k, v in r.items() if k != "raw"} for r in rows]
    extra = {"Targets (trainer_over_plain of the rows above)": _targets(table)}
    extra["Where the trainer's time goes (local, batch 64, ms per step, median)"] = breakdown[
        "table"
    ]
    return {
        "name": NAME,
        "description": (
            "examples/s of dist_share.train.trainer.Trainer vs a hand-written loop on the same model "
            "(siamese, conv2d tower, project defaults), interleaved blocks of "
            f"{block} steps, {warmup} warm-up block(s) dropped, median over {repeats} pairs. "
            "quiet: no run_dir/progress bar; default: metrics.jsonl + TensorBoard + progress bar "
            "+ checkpoint every 200 steps; default_spl10: default with training.steps_per_loop=10 "
            "(target >= 1.0; default at batch 64: target >= 0.98); fit: the Trainer's keras_fit "
            "loop against the same plain loop as the custom loop's row (fit vs custom = the ratio "
            "of the two rows); mirrored: 2 logical CPU devices, plain = TF's MirroredStrategy "
            "custom-training loop (strategy.run, Keras optimizer summing across replicas). Horovod: horovodrun -np 2 (Gloo), 1 intra-op thread "
            "per process; plain = Horovod's TF2 example loop. trainer_over_plain: median over pairs of the "
            "wall-clock examples/s ratio (< 1: the Trainer is slower); cpu_per_step_trainer_over_plain: "
            "ratio of process CPU time per step (> 1: the Trainer costs more)."
        ),
        "params": {"block_steps": block, "repeats": repeats, "warmup_blocks": warmup},
        "cases": rows,
        "breakdown": breakdown,
        "table": table,
        "extra_tables": extra,
        "plot": {"y": ["trainer_over_plain"], "title": "Trainer / hand-written loop (examples/s)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
