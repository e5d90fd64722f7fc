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


def _case(
    strategy: str,
    variant: str,
    batch: int,
    block: int,
    repeats: int,
    warmup: int,
    intra: int | None,
    timeout: float,
) -> dict[str, Any]:
    from dist_share.processes import horovodrun_command

    args = [
        "--strategy", strategy, "--variant", variant, "--batch", str(batch),
        "--block", str(block), "--repeats", str(repeats), "--warmup", str(warmup),
    ]  # fmt: skip
    if intra:
        args += ["--intra", str(intra), "--inter", str(intra)]
    launcher = None
    if strategy == "horovod":
        launcher = lambda argv: horovodrun_command(2, argv)  # noqa: E731
    results = run_worker("overhead", args, timeout, launcher, worker_python_env(intra, intra))
    r0 = next(r for r in results if r["rank"] == 0)
    trainer, plain = r0["trainer_examples_per_sec"], r0["plain_examples_per_sec"]
    ratios = [t / p for t, p in zip(trainer, plain)]
    return {
        "case": f"{strategy} x{r0['world_size']} {variant}",
        "strategy": strategy,
        "processes": r0["world_size"],
        "variant": variant,
        "global_batch": batch,
        "intra_op_threads": intra or "default",
        "trainer_ex_per_s": median(trainer),
        "plain_ex_per_s": median(plain),
        "trainer_over_plain": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": len(ratios),
        "raw": {"trainer": trainer, "plain": plain, "world_size": r0["world_size"]},
    }


def run(quick: bool = False) -> dict:
    if quick:
        cases = [("local", "quiet", 64, None)]
        block, repeats, warmup, timeout = 10, 2, 1, 120
    else:
        cases = [
            ("local", "quiet", 64, None),
            ("local", "default", 64, None),
            ("local", "quiet", 512, None),
            ("horovod", "quiet", 128, 1),
            ("horovod", "default", 128, 1),
        ]
        block, repeats, warmup, timeout = 50, 9, 2, 600
    rows = [_case(s, v, b, block, repeats, warmup, t, timeout) for s, v, b, t in cases]
    table = [{k: v for k, v in r.items() if k != "raw"} for r in rows]
    return {
        "name": NAME,
        "description": (
            "examples/s of dist_share.training.Trainer vs a hand-written loop on the same model "
            "(siamese, conv2d tower, project defaults), interleaved blocks of "
            f"{block} steps, {warmup} warm-up block(s) dropped, median over {repeats} pairs. "
            "quiet: no run_dir/progress bar; default: metrics.jsonl + TensorBoard + progress bar "
            "+ checkpoint every 200 steps. Horovod: horovodrun -np 2 (Gloo), 1 intra-op thread "
            "per process; plain = Horovod's TF2 example loop."
        ),
        "params": {"block_steps": block, "repeats": repeats, "warmup_blocks": warmup},
        "cases": rows,
        "table": table,
        "plot": {"y": ["trainer_over_plain"], "title": "Trainer / hand-written loop (examples/s)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
