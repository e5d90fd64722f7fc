"""In-batch negatives against scale: the trained model at 1, 2 and 4 replicas, global vs local.

The two-tower synthetic config (configs/two_tower_synthetic.yaml) with ``in_batch_softmax`` and
every pair positive, at a FIXED global batch, trained the same number of steps through the CLI
(``dist-share train``) under MirroredStrategy with 1, 2 and 4 logical CPU devices (1 replica:
``local``), with ``model.loss.negatives`` ``global`` (every query scores the whole global
batch's candidates, whatever the split) and ``local`` (only its replica's batch / N). The
final eval (``in_batch_top1`` ranks among the global eval batch whatever the run trained with;
the eval loss uses the run's own negatives) comes from each run's metrics.jsonl; one more
process (workers/retrieval_eval.py) scores every checkpoint over the global batch alike
(``eval_loss_global``, ``item_top1``). The seed-to-seed noise is the 1-replica global run
with other ``training.seed`` values (weights and data order; the data itself is fixed by
``data.split_seed``). Quality only: the run times are recorded, not compared (TF's default
thread pools, one process per run).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, bench_main, run_worker, worker_python_env

NAME = "negatives"
CONFIG = REPO / "configs" / "two_tower_synthetic.yaml"
GLOBAL_BATCH = 128
# A run is "within noise" of the 1-replica run when each of these differs from it by at most
# this many seed-to-seed standard deviations.
NOISE_METRICS = ("eval_in_batch_top1", "item_top1", "eval_loss_global")
NOISE_SDS = 2.0
# quick: (steps, replica counts besides 1, negatives run at them, training seeds, timeout s).
# Quick runs twice: the 1-replica run and the path with the most parts.
SIZES = {
    False: (600, (2, 4), ("global", "local"), (0, 1, 2), 600),
    True: (20, (2,), ("local",), (0,), 240),
}


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("dist-share")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dist_share.cli"]


def _train(
    run_dir: Path, replicas: int, negatives: str, seed: int, steps: int, timeout: float
) -> dict[str, Any]:
    """One ``dist-share train`` run; its last train record and its final eval."""
    from tests.helpers import processes

    strategy = ["--strategy", "local"]
    if replicas > 1:
        strategy = ["--strategy", "mirrored", "--set", f"strategy.num_cpu_devices={replicas}"]
    sets = [
        "model.loss.type=in_batch_softmax",
        f"model.loss.negatives={negatives}",
        "data.synthetic.positive_fraction=1.0",
        f"training.batch_size={GLOBAL_BATCH}",
        f"training.seed={seed}",
        "training.eval_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.every=0",
    ]
    argv = [*_cli(), "train", str(CONFIG), "--run-dir", str(run_dir), "--steps", str(steps)]
    argv += strategy + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    processes.run_job(argv, timeout=timeout, env=worker_python_env(), cwd=str(REPO)).check()
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"][-1]
    final = [r for r in records if r["split"] == "eval"][-1]
    return {
        "replicas": replicas,
        "negatives": negatives,
        "seed": seed,
        "candidates_per_query": GLOBAL_BATCH if negatives == "global" else GLOBAL_BATCH // replicas,
        "train_loss_last": train["loss"],
        "train_loss_step": train["step"],
        "eval_in_batch_top1": final["in_batch_top1"],
        "eval_loss": final["loss"],
        "run_seconds": seconds,
        "run_dir": str(run_dir),
    }


def _noise(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for m in ("eval_in_batch_top1", "item_top1", "eval_loss_global", "train_loss_last"):
        values = [r[m] for r in rows]
        out[m] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "range": max(values) - min(values),
        }
    return out


def _within_noise(run: dict, base: dict, noise: dict) -> str:
    sds = {m: noise[m]["sd"] for m in NOISE_METRICS}
    if any(math.isnan(sd) for sd in sds.values()):
        return "n/a"  # one seed: no noise estimate
    close = all(abs(run[m] - base[m]) <= NOISE_SDS * sd for m, sd in sds.items())
    return "yes" if close else "no"


def run(quick: bool = False) -> dict:
    steps, replica_counts, kinds, seeds, timeout = SIZES[quick]
    with tempfile.TemporaryDirectory(prefix="bench_negatives_") as tmp:
        runs = [_train(Path(tmp) / f"r1_s{s}", 1, "global", s, steps, timeout) for s in seeds]
        for n in replica_counts:
            for negatives in kinds:
                path = Path(tmp) / f"r{n}_{negatives}"
                runs.append(_train(path, n, negatives, seeds[0], steps, timeout))
        scored = run_worker("retrieval_eval", [r["run_dir"] for r in runs], timeout)[0]["runs"]
    for r, s in zip(runs, scored, strict=True):
        r.update({k: s[k] for k in ("eval_loss_global", "item_top1", "rows_with_duplicate_item")})
        del r["run_dir"]
    seed_runs, base = runs[: len(seeds)], runs[0]
    noise = _noise(seed_runs)
    table = []
    for r in [base, *runs[len(seeds) :]]:
        table.append(
            dict(
                r,
                negatives="global = local" if r is base else r["negatives"],
                d_top1=r["eval_in_batch_top1"] - base["eval_in_batch_top1"],
                d_loss_global=r["eval_loss_global"] - base["eval_loss_global"],
                within_noise=_within_noise(r, base, noise),
            )
        )
    # The plot's lines start at the 1-replica run, which is both a global and a local run.
    plot_rows = [dict(base, negatives="global"), dict(base, negatives="local")]
    plot_rows += runs[len(seeds) :]
    noise_rows = [
        {k: r[k] for k in ("seed", "eval_in_batch_top1", "item_top1", "eval_loss_global",
                           "train_loss_last")}
        for r in seed_runs
    ]  # fmt: skip
    for stat in ("mean", "sd", "range"):
        noise_rows.append({"seed": stat} | {m: v[stat] for m, v in noise.items()})
    columns = (
        "replicas", "negatives", "candidates_per_query", "train_loss_last", "eval_loss",
        "eval_loss_global", "eval_in_batch_top1", "item_top1", "d_top1", "d_loss_global",
        "within_noise", "run_seconds",
    )  # fmt: skip
    return {
        "name": NAME,
        "description": (
            f"{CONFIG.name}, in_batch_softmax, positive_fraction 1.0, global batch "
            f"{GLOBAL_BATCH}, {steps} steps, MirroredStrategy with 1 (local), "
            f"{', '.join(map(str, replica_counts))} CPU devices, training seed {seeds[0]}, "
            "TF's default thread pools (one process per run). "
            "train_loss_last: the mean of the last logged window (log_every steps); it and "
            "eval_loss use the run's own negatives (a local run's over batch / N candidates), "
            "eval_loss_global and item_top1 (workers/retrieval_eval.py) and eval_in_batch_top1 "
            "rank among the whole eval batch for every run. d_*: minus the 1-replica run. "
            f"within_noise: every |d| (top1, item_top1, loss_global) <= {NOISE_SDS:g} sd of "
            f"the 1-replica run over training seeds {list(seeds)} (table below)."
        ),
        "params": {
            "config": str(CONFIG.relative_to(REPO)),
            "global_batch": GLOBAL_BATCH,
            "steps": steps,
            "replicas": [1, *replica_counts],
            "seeds": list(seeds),
            "threads": "TF defaults (one process per run)",
        },
        "runs": runs,
        "noise": noise,
        "table": [{c: row.get(c) for c in columns} for row in table],
        "extra_tables": {"Seed-to-seed noise (1 replica, global negatives)": noise_rows},
        "plot": {
            "rows": plot_rows,
            "x": "replicas",
            "y": ["eval_in_batch_top1"],
            "group": ["negatives"],
            "logx": True,
            "title": f"eval in_batch_top1 at global batch {GLOBAL_BATCH} ({steps} steps)",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
