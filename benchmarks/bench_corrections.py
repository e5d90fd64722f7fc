"""Two-tower retrieval quality with and without the in-batch softmax's corrections, by popularity.

configs/two_tower_retrieval.yaml (synthetic interactions, item popularity Zipf 1.1 inside each
cluster, every training row a relevant pair, in-batch softmax over the global batch of 128)
trained the same number of steps four ways: ``plain`` (no correction), ``hits``
(remove_accidental_hits), ``logq`` (logq_correction) and ``both``. Every run's towers are then
scored the same way (workers/tower_quality.py): each eval row's own item ranked against the
whole catalogue of 2000 items by the query and candidate towers (exact), recall@10 and @100
overall and by popularity decile of the row's item (decile 1: the tenth of the items that are
most often a training row's item). Each variant runs with 2 training seeds; the tables give
their mean.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, bench_main, run_worker, train_run

NAME = "corrections"
CONFIG = REPO / "configs" / "two_tower_retrieval.yaml"
HITS, LOGQ = "model.loss.remove_accidental_hits", "model.loss.logq_correction"
VARIANTS = {
    "plain": [f"{HITS}=false", f"{LOGQ}=false"],
    "hits": [f"{HITS}=true", f"{LOGQ}=false"],
    "logq": [f"{HITS}=false", f"{LOGQ}=true"],
    "both": [f"{HITS}=true", f"{LOGQ}=true"],
}
# quick: (steps, seeds, timeout s)
SIZES = {False: (1000, (0, 1), 900), True: (10, (0,), 300)}


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.fmean(values) if values else None


def run(quick: bool = False) -> dict:
    steps, seeds, timeout = SIZES[quick]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_corrections_") as tmp:
        dirs = []
        for name, sets in VARIANTS.items():
            for seed in seeds:
                run_dir = Path(tmp) / f"{name}_s{seed}"
                sets_ = [*sets, f"training.seed={seed}", "training.eval_every=0"]
                trained = train_run(CONFIG, run_dir, sets_, steps, timeout)
                runs.append(
                    {
                        "variant": name,
                        "seed": seed,
                        "run_seconds": trained["run_seconds"],
                        "eval_in_batch_top1": trained["final_eval"]["in_batch_top1"],
                    }
                )
                dirs.append(str(run_dir))
        scored = run_worker("tower_quality", ["two_tower", *dirs], timeout)[0]["runs"]
    for r, s in zip(runs, scored, strict=True):
        r.update(recall_at_10=s["recall_at_10"], recall_at_100=s["recall_at_100"])
        r["by_decile"] = s["by_decile"]
    table, deciles = [], []
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        table.append(
            {
                "variant": name,
                "steps": steps,
                "seeds": len(mine),
                **{
                    k: _mean(mine, k)
                    for k in ("recall_at_10", "recall_at_100", "eval_in_batch_top1")
                },
                "run_seconds": _mean(mine, "run_seconds"),
            }
        )
        for d in range(10):
            rows = [r["by_decile"][d] for r in mine]
            deciles.append(
                {
                    "variant": name,
                    "decile": d + 1,
                    "eval_rows": rows[0]["rows"],
                    "recall_at_10": _mean(rows, "recall_at_10"),
                    "recall_at_100": _mean(rows, "recall_at_100"),
                }
            )
    by_decile = [
        {"decile": d + 1, "eval_rows": deciles[d]["eval_rows"]}
        | {
            f"{v}_r@100": next(
                x["recall_at_100"] for x in deciles if x["variant"] == v and x["decile"] == d + 1
            )
            for v in VARIANTS
        }
        for d in range(10)
    ]
    return {
        "name": NAME,
        "description": (
            f"{CONFIG.relative_to(REPO)}, {steps} steps at global batch 128, one process "
            f"(local), training seeds {list(seeds)} (mean). recall@k: the eval row's own item "
            "among the k best of the 2000-item catalogue (workers/tower_quality.py); "
            "eval_in_batch_top1: the run's own final eval. Popularity deciles: items by their "
            "count as a training row's item, 10 equal groups, 1 = most popular."
        ),
        "params": {"steps": steps, "seeds": list(seeds), "global_batch": 128},
        "runs": runs,
        "table": table,
        "extra_tables": {"recall@100 by popularity decile of the row's item": by_decile},
        "plot": {
            "rows": deciles,
            "x": "decile",
            "y": ["recall_at_100"],
            "group": ["variant"],
            "title": "recall@100 by item-popularity decile",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
