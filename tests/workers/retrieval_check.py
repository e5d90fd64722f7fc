"""Exact top-k over a small integer corpus (many exact ties) on the replicas of a strategy.

Run as ``python tests/workers/retrieval_check.py --strategy mirrored --num-cpu-devices 2 --out F``
or under ``horovodrun -np 2 ... --strategy horovod``; writes ``F.rank{R}.json`` with each case's
ranked ids and scores, and the metrics computed from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.workers.replicas import strategy_from_argv, write_result

QUERIES, CORPUS, DIM, CLASSES, K = 37, 203, 6, 5, 100


def small_corpus(seed: int = 7) -> dict[str, np.ndarray]:
    """Vectors of small integers: every score is exact in float32, and many are equal."""
    rng = np.random.default_rng(seed)
    corpus = rng.integers(-2, 3, (CORPUS, DIM)).astype(np.float32)
    return {
        "corpus": corpus,
        "labels": rng.integers(0, CLASSES, CORPUS),
        "queries": rng.integers(-2, 3, (QUERIES, DIM)).astype(np.float32),
        "gallery_queries": rng.choice(CORPUS, QUERIES, replace=False),
    }


def search_cases(strategy: Any, chunk: int = 16) -> dict[str, dict]:
    """Each case's top-k (ids, scores) and metrics under ``strategy``."""
    from dist_share.retrieval.metrics import class_relevance, ranking_metrics
    from dist_share.retrieval.topk import ExactTopK, ids_dataset_fn

    data = small_corpus()
    corpus_fn = ids_dataset_fn(data["corpus"], np.arange(CORPUS), chunk)
    out = {}
    for kind in ("dot", "l2"):
        for gallery in (False, True):
            if gallery:  # the queries are corpus items, excluded from their own results
                ids = data["gallery_queries"]
                queries, query_ids, query_labels = data["corpus"][ids], ids, data["labels"][ids]
            else:
                queries, query_ids = data["queries"], None
                query_labels = np.arange(QUERIES) % CLASSES
            top = ExactTopK(strategy, queries, K, kind, query_ids).search(corpus_fn)
            hits, relevant = class_relevance(top.ids, query_labels, data["labels"], gallery)
            out[f"{kind}_{'gallery' if gallery else 'queries'}"] = {
                "ids": top.ids.tolist(),
                "scores": top.scores.tolist(),
                "metrics": ranking_metrics(hits, relevant),
            }
    return out


if __name__ == "__main__":
    strategy, out = strategy_from_argv()
    write_result(
        out, strategy, {"num_replicas": strategy.num_replicas, "cases": search_cases(strategy)}
    )
