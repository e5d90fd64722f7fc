"""Triplet quality: random pre-made triplets vs triplets mined in the global batch, same steps.

Each objective trains the digits triplet tower (the conv tower with batch norm of
configs/triplet_digits.yaml) for the same number of steps at global batch 64 and margin 1.0:

* ``random``: configs/triplet_digits.yaml, pre-made random triplets (64 triplets, 192 images
  per step);
* ``batch_hard`` / ``semi_hard``: configs/triplet_digits_mined.yaml, single labelled digits in
  class-balanced batches (8 digits x 8 images, 64 images per step), triplets mined in the batch.

Every run's tower is then scored the same way on held-out digits (workers/tower_quality.py):
triplet accuracy on one fixed set of 2048 eval triplets, and recall@1/5/10 over the whole eval
gallery. Each objective runs with 3 training seeds; the table gives their mean and spread.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, bench_main, run_worker, train_run

NAME = "mining"
CONFIGS = REPO / "configs"
OBJECTIVES = {
    "random": (CONFIGS / "triplet_digits.yaml", []),
    "batch_hard": (CONFIGS / "triplet_digits_mined.yaml", []),
    "semi_hard": (CONFIGS / "triplet_digits_mined.yaml", ["model.loss.mining=semi_hard"]),
}
METRICS = ("triplet_accuracy", "recall_at_1", "recall_at_5", "recall_at_10")
# quick: (steps, seeds, timeout s)
SIZES = {False: (600, (0, 1, 2), 900), True: (10, (0,), 300)}


def run(quick: bool = False) -> dict:
    steps, seeds, timeout = SIZES[quick]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_mining_") as tmp:
        dirs = []
        for name, (config, sets) in OBJECTIVES.items():
            for seed in seeds:
                run_dir = Path(tmp) / f"{name}_s{seed}"
                trained = train_run(
                    config, run_dir, [*sets, f"training.seed={seed}", "training.eval_every=0"],
                    steps, timeout,
                )  # fmt: skip
                runs.append(
                    {"objective": name, "seed": seed, "run_seconds": trained["run_seconds"]}
                )
                dirs.append(str(run_dir))
        scored = run_worker("tower_quality", ["triplet", *dirs], timeout)[0]["runs"]
    for r, s in zip(runs, scored, strict=True):
        r.update({m: s[m] for m in METRICS})
    table = []
    for name in OBJECTIVES:
        mine = [r for r in runs if r["objective"] == name]
        row: dict = {"objective": name, "steps": steps, "seeds": len(mine)}
        for m in METRICS:
            values = [r[m] for r in mine]
            row[m] = statistics.fmean(values)
            row[f"{m}_range"] = max(values) - min(values)
        row["run_seconds"] = statistics.fmean(r["run_seconds"] for r in mine)
        table.append(row)
    return {
        "name": NAME,
        "description": (
            f"{steps} steps at global batch 64, margin 1.0, one process (local), training "
            f"seeds {list(seeds)}: mean over the seeds and range (max - min). random: "
            "configs/triplet_digits.yaml (pre-made triplets); batch_hard / semi_hard: "
            "configs/triplet_digits_mined.yaml (single labelled digits, 8 x 8 class-balanced "
            "batches). Scored by workers/tower_quality.py: triplet_accuracy on 2048 fixed eval "
            "triplets, recall@k over the eval gallery (each image a query, itself excluded). "
            "run_seconds: the whole dist-share train process."
        ),
        "params": {"steps": steps, "seeds": list(seeds), "global_batch": 64},
        "runs": runs,
        "table": table,
        "plot": {"x": "objective", "y": ["triplet_accuracy", "recall_at_1"], "title": NAME},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
