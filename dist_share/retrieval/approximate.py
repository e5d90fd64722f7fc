"""An approximate index (faiss HNSW) over a corpus, judged against the exact top-k."""

from __future__ import annotations

import time

import faiss
import numpy as np

INDEXES = ("faiss",)
RECALL_AT = 10


def hnsw_index(
    vectors: np.ndarray, kind: str, neighbours: int = 32, ef_search: int = 64
) -> faiss.Index:
    """An HNSW graph over ``vectors`` for dot-product (``dot``) or Euclidean (``l2``) search."""
    metric = faiss.METRIC_INNER_PRODUCT if kind == "dot" else faiss.METRIC_L2
    index = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, metric)
    index.hnsw.efSearch = ef_search
    index.add(np.ascontiguousarray(vectors, np.float32))
    return index


def approximate_recall(
    queries: np.ndarray,
    corpus: np.ndarray,
    corpus_ids: np.ndarray,
    kind: str,
    exact_ids: np.ndarray,
    query_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """recall@10 of an HNSW index against the exact top 10 (``exact_ids``, best first), its
    build time and its queries per second. ``query_ids``: each query's own corpus id, left
    out of its results as the exact search leaves it out."""
    t0 = time.perf_counter()
    index = hnsw_index(corpus, kind)
    built = time.perf_counter() - t0
    extra = 0 if query_ids is None else 1  # a query finds itself: ask for one more
    t0 = time.perf_counter()
    _, rows = index.search(np.ascontiguousarray(queries, np.float32), RECALL_AT + extra)
    searched = time.perf_counter() - t0
    found = np.where(rows >= 0, corpus_ids[np.maximum(rows, 0)], -1)
    recall = []
    for q, truth in enumerate(exact_ids[:, :RECALL_AT]):
        truth = set(truth[np.isin(truth, corpus_ids)].tolist())
        own = -2 if query_ids is None else query_ids[q]
        mine = [i for i in found[q].tolist() if i != own and i >= 0][:RECALL_AT]
        if truth:
            recall.append(len(truth.intersection(mine)) / len(truth))
    return {
        f"faiss_recall@{RECALL_AT}": float(np.mean(recall)) if recall else float("nan"),
        "faiss_build_seconds": built,
        "faiss_queries_per_second": len(queries) / max(searched, 1e-9),
    }
