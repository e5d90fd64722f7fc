"""Retrieval-eval worker: a two-tower run's last checkpoint scored on its eval split, tie-safe.

argv: OUT_DIR RUN_DIR [RUN_DIR ...]

One process, one replica, every run directory in turn (TensorFlow starts once). Each eval batch
of the run's global batch size is embedded by the restored model; the scores are then taken in
float64 over the batch's candidates, the same for every run whatever it trained with:

* ``eval_loss_global``: the in-batch softmax loss over all the batch's candidates (the run's
  temperature), so runs trained with ``negatives: local`` get the number global ones log;
* ``item_top1``: the best-scoring candidate is the query's own item (a batch often holds the
  same item twice; identical items score alike and either counts as a hit), a cross-check of
  the ``in_batch_top1`` the run logged;
* ``rows_with_duplicate_item``: the fraction of rows whose item occurs again in the batch.

Writes ``retrieval_eval.json``: one record per run directory, in the order given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workers.wlib import write_result


def score_batch(q: np.ndarray, c: np.ndarray, items: np.ndarray, temperature: float) -> dict:
    """Sums over one batch's rows (divide by the rows of the split for the means)."""
    logits = (q @ c.T) / temperature
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    rows = np.arange(len(q))
    best = logits.argmax(axis=1)
    _, inverse, counts = np.unique(items, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    return {
        "eval_loss_global": float(np.sum(lse - logits[rows, rows])),
        "item_top1": float(np.sum(inverse[best] == inverse)),
        "rows_with_duplicate_item": float(np.sum(counts[inverse] > 1)),
        "count": float(len(q)),
    }


def evaluate_run(run_dir: Path, strategy: Any) -> dict:
    """The scores of `run_dir`'s newest checkpoint (see the module docstring)."""
    import tensorflow as tf

    from dist_share.families.build import build_model
    from dist_share.run.inputs import RunInputs
    from dist_share.run.resolve import load_config
    from dist_share.train.state import TrainState

    cfg = load_config(run_dir / "config.yaml", ["strategy.name=local"])
    inputs = RunInputs(cfg.data, cfg.training.batch_size, cfg.training.seed)
    state = TrainState(lambda: build_model(cfg.model, inputs.specs), strategy, cfg, run_dir)
    step = state.restore(broadcast=False)
    model = state.spec.model
    temperature = float(cfg.model.loss.get("temperature", 1.0))
    candidate_features = list(cfg.model.candidate.features)
    predict = tf.function(lambda features: model(features, training=False))
    totals: dict[str, float] = {}
    for features, _labels in inputs.eval_fn(tf.distribute.InputContext()):
        pair = predict(features).numpy().astype(np.float64)
        items = np.concatenate(
            [np.asarray(features[f]).reshape(len(pair), -1) for f in candidate_features], axis=1
        )
        for k, v in score_batch(pair[:, 0], pair[:, 1], items, temperature).items():
            totals[k] = totals.get(k, 0.0) + v
    count = totals.pop("count")
    return {"run_dir": str(run_dir), "step": step, "examples": count} | {
        k: v / count for k, v in totals.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("run_dirs", type=Path, nargs="+")
    args = p.parse_args()
    t0 = time.perf_counter()

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name="local"))
    runs = [evaluate_run(d, strategy) for d in args.run_dirs]
    write_result(args.out_dir, "retrieval_eval", {"runs": runs, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
