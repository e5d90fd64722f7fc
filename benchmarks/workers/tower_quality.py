"""Tower-quality worker: trained runs' towers scored on held-out data, the same way for every run.

argv: OUT_DIR triplet|two_tower RUN_DIR [RUN_DIR ...]

One process, one replica; each run directory's newest checkpoint is restored and its tower
applied to the eval split of the run's data, whatever objective the run trained with:

* ``triplet``: the shared tower embeds the eval digits. ``triplet_accuracy``: the fraction of
  a fixed set of held-out triplets (configs/triplet_digits.yaml's eval triplets, 2048) with
  d(anchor, positive) < d(anchor, negative); ``recall_at_{1,5,10}``: over the whole eval
  gallery, each image a query, itself excluded, a hit when one of its k nearest shows its digit.
* ``two_tower``: every item of the catalogue is embedded by the candidate tower and every eval
  row's query by the query tower; the row's own item is ranked against the whole catalogue
  (exact, brute force). ``recall_at_{10,100}`` overall and by popularity decile of the row's
  item: items sorted by how often they are a training row's item, cut into 10 groups of equal
  size (decile 1: the most popular tenth).

Writes ``tower_quality.json``: one record per run directory, in the order given.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workers.wlib import write_result

EVAL_TRIPLETS = 2048


def restore(run_dir: Path, strategy: Any) -> tuple[Any, Any, int]:
    """(config, model, step) of a run directory's newest checkpoint."""
    from dist_share.families.build import build_model
    from dist_share.run.inputs import RunInputs
    from dist_share.run.resolve import load_config
    from dist_share.train.state import TrainState

    cfg = load_config(run_dir / "config.yaml", ["strategy.name=local"])
    inputs = RunInputs(cfg.data, cfg.training.batch_size, cfg.training.seed)
    state = TrainState(lambda: build_model(cfg.model, inputs.specs), strategy, cfg, run_dir)
    return cfg, state.spec.model, state.restore(broadcast=False)


def triplet_scores(cfg: Any, model: Any) -> dict[str, float]:
    from dist_share.data.digits import digits_with_labels
    from dist_share.families.registry import get_family

    tower = model.get_layer("tower")

    def embed(x: np.ndarray) -> np.ndarray:
        return np.asarray(tower([x] * tower.num_streams, training=False)[0], np.float64)

    tuples = dataclasses.replace(cfg.data, labels="given")
    feats, _ = get_family("triplet").examples(tuples, "eval", EVAL_TRIPLETS)
    a, p, n = (embed(feats[s]) for s in ("anchor", "positive", "negative"))
    out = {
        "triplet_accuracy": float(
            np.mean(np.linalg.norm(a - p, axis=1) < np.linalg.norm(a - n, axis=1))
        )
    }
    images, labels, _ = digits_with_labels(cfg.data, "eval", 0)
    e = embed(images)
    d = np.sum(e**2, 1)[:, None] - 2 * e @ e.T + np.sum(e**2, 1)[None, :]
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)
    for k in (1, 5, 10):
        out[f"recall_at_{k}"] = float(
            np.mean((labels[nearest[:, :k]] == labels[:, None]).any(axis=1))
        )
    out["gallery"] = len(labels)
    return out


def two_tower_scores(cfg: Any, model: Any) -> dict[str, Any]:
    from dist_share.run.inputs import load_arrays

    num_items = cfg.data.synthetic.num_items
    history = cfg.data.synthetic.history_length
    catalogue = {
        "query_user": np.zeros(num_items, np.int32),
        "query_history": np.zeros((num_items, history), np.int32),
        "candidate_item": np.arange(num_items, dtype=np.int32),
    }
    items = np.asarray(model.predict(catalogue, batch_size=512, verbose=0))[:, 1]
    feats, _ = load_arrays(cfg.data, "eval")
    queries = np.asarray(model.predict(feats, batch_size=512, verbose=0))[:, 0]
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    own = feats["candidate_item"]
    rank = (scores > scores[np.arange(len(own)), own][:, None]).sum(axis=1)  # 0 = first
    train, _ = load_arrays(cfg.data, "train")
    counts = np.bincount(train["candidate_item"], minlength=num_items)
    order = np.argsort(-counts, kind="stable")
    decile = np.empty(num_items, np.int64)
    decile[order] = np.arange(num_items) * 10 // num_items + 1
    out: dict[str, Any] = {"eval_rows": len(own)}
    for k in (10, 100):
        out[f"recall_at_{k}"] = float(np.mean(rank < k))
    out["by_decile"] = [
        {
            "decile": d,
            "rows": int(np.sum(decile[own] == d)),
            **{
                f"recall_at_{k}": float(np.mean(rank[decile[own] == d] < k))
                if np.any(decile[own] == d)
                else None
                for k in (10, 100)
            },
        }
        for d in range(1, 11)
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("kind", choices=("triplet", "two_tower"))
    p.add_argument("run_dirs", type=Path, nargs="+")
    args = p.parse_args()
    t0 = time.perf_counter()

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name="local"))
    score = triplet_scores if args.kind == "triplet" else two_tower_scores
    runs = []
    for run_dir in args.run_dirs:
        cfg, model, step = restore(run_dir, strategy)
        runs.append({"run_dir": str(run_dir), "step": step, **score(cfg, model)})
    write_result(args.out_dir, "tower_quality", {"runs": runs, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
