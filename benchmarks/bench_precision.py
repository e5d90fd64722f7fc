"""Precision and XLA on this CPU: step time of bfloat16, float16 and XLA against float32.

One worker (benchmarks/workers/precision_cost.py) steps a Trainer per variant of the project's
siamese config round-robin, a block of steps each. Ratios are float32's block time over the
variant's in the same round (> 1: faster than float32), median over rounds. For information
only: these are CPU numbers, and the options exist for GPUs (docs/GPU.md).
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import bench_main, median, run_worker

NAME = "precision"


def run(quick: bool = False) -> dict:
    block, repeats, warmup, timeout = (5, 3, 1, 300) if quick else (50, 9, 1, 1500)
    args = ["--block", str(block), "--repeats", str(repeats), "--warmup", str(warmup)]
    (result,) = run_worker("precision_cost", args, timeout)
    walls = result["walls"]
    base = walls["float32"][warmup:]
    rows: list[dict[str, Any]] = []
    for name, times in walls.items():
        timed = times[warmup:]
        rows.append(
            {
                "variant": name,
                "ms_per_step": 1e3 * median(timed) / block,
                "speed_over_float32": median([b / t for b, t in zip(base, timed, strict=True)]),
                "compiled": result["compiled"][name],
            }
        )
    return {
        "name": NAME,
        "description": (
            "The project's siamese config (conv2d tower, global batch 64), strategy local, "
            f"{repeats} rounds of {block} steps per variant after {warmup} warm-up round, "
            "variants interleaved in one process. speed_over_float32: median over rounds of "
            "float32's block time over the variant's (> 1 is faster). compiled: whether XLA "
            "compiled the replica pass. CPU only: for information, the options are for GPUs."
        ),
        "params": {"block_steps": block, "repeats": repeats, "warmup_blocks": warmup},
        "table": rows,
        "plot": {"y": ["speed_over_float32"], "title": "Step speed over float32 (CPU)"},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
