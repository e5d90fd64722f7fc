"""Retrieval metrics from ranked ids: recall@k, hit rate@k, mAP@100 and NDCG@10 (NumPy)."""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10, 100)
MAP_AT = 100
NDCG_AT = 10
DEPTH = max(*RECALL_AT, MAP_AT, NDCG_AT)  # how many ranked ids the metrics read


def class_relevance(
    top_ids: np.ndarray, query_labels: np.ndarray, corpus_labels: np.ndarray, self_in_corpus: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(hits [Q, K], relevant counts [Q]) where a corpus item is relevant to a query of its
    class. ``corpus_labels[id]`` is item ``id``'s class; ids outside it (no result) miss. With
    ``self_in_corpus`` each query is a corpus item too, excluded from its own results and from
    its count of relevant items."""
    valid = (top_ids >= 0) & (top_ids < len(corpus_labels))
    found = corpus_labels[np.where(valid, top_ids, 0)]
    hits = valid & (found == query_labels[:, None])
    classes, counts = np.unique(corpus_labels, return_counts=True)
    per_class = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    relevant = np.array([per_class.get(c, 0) for c in query_labels.tolist()], np.int64)
    return hits, relevant - int(self_in_corpus)


def set_relevance(
    top_ids: np.ndarray, offsets: np.ndarray, relevant_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(hits [Q, K], relevant counts [Q]) where query q's relevant ids are
    ``relevant_ids[offsets[q]:offsets[q + 1]]`` (a CSR list, each query's ids sorted)."""
    hits = np.zeros(top_ids.shape, bool)
    for q in range(len(top_ids)):
        mine = relevant_ids[offsets[q] : offsets[q + 1]]
        hits[q] = np.isin(top_ids[q], mine)
    return hits, np.diff(offsets).astype(np.int64)


def ranking_metrics(hits: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Means over the queries that have at least one relevant item (the others are left out
    and counted in ``queries_without_relevant``). ``hits[q, i]``: the (i+1)-th result of query
    q is relevant. docs/RETRIEVAL.md defines each metric."""
    keep = relevant > 0
    hits, relevant = hits[keep].astype(np.float64), relevant[keep]
    out: dict[str, float] = {
        "queries": float(len(relevant)),
        "queries_without_relevant": float((~keep).sum()),
    }
    if not len(relevant):
        return out
    found = np.cumsum(hits, axis=1)  # relevant items in the top i+1
    depth = hits.shape[1]

    def at(k: int) -> np.ndarray:
        return found[:, min(k, depth) - 1]

    for k in RECALL_AT:
        out[f"recall@{k}"] = float(np.mean(at(k) / relevant))
        out[f"hit_rate@{k}"] = float(np.mean(at(k) > 0))
    m = min(MAP_AT, depth)
    precision = found[:, :m] / np.arange(1, m + 1)
    out[f"map@{MAP_AT}"] = float(
        np.mean((precision * hits[:, :m]).sum(axis=1) / np.minimum(relevant, MAP_AT))
    )
    n = min(NDCG_AT, depth)
    discount = 1.0 / np.log2(np.arange(2, n + 2))
    dcg = (hits[:, :n] * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(relevant, n) - 1]
    out[f"ndcg@{NDCG_AT}"] = float(np.mean(dcg / ideal))
    return out
