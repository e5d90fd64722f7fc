"""Retrieval quality of a query tower and a corpus tower: exact top-k over the whole corpus, then metrics."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from dist_share.distribute.strategies import Strategy
from dist_share.families.base import RetrievalTask, Tower
from dist_share.retrieval.approximate import approximate_recall
from dist_share.retrieval.metrics import DEPTH, class_relevance, ranking_metrics, set_relevance
from dist_share.retrieval.topk import ExactTopK, TopK, ids_dataset_fn


def embed_rows(tower: Tower, features: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
    """``[n, d]`` float32 embeddings of in-memory rows, in this process."""
    forward = tf.function(lambda f: tower.model(f, training=False), reduce_retracing=True)
    ds = tf.data.Dataset.from_tensor_slices(features).batch(batch_size)
    return np.concatenate([np.asarray(forward(batch), np.float32) for batch in ds])


def search(
    strategy: Strategy, task: RetrievalTask, queries: np.ndarray, corpus: Tower, chunk: int = 4096
) -> TopK:
    """The exact top `DEPTH` corpus ids of the embedded ``queries``; each replica embeds and
    scores its share of the corpus."""
    search = ExactTopK(
        strategy,
        queries,
        DEPTH,
        corpus.similarity,
        query_ids=task.queries.ids if task.exclude_self else None,
        encode=lambda features: corpus.model(features, training=False),
    )
    return search.search(ids_dataset_fn(task.corpus.features, task.corpus.ids, chunk))


def relevance(task: RetrievalTask, top: TopK) -> tuple[np.ndarray, np.ndarray]:
    """(hits, relevant counts) of the ranked ids under the task's relevance."""
    if task.relevant_offsets is not None:
        return set_relevance(top.ids, task.relevant_offsets, task.relevant_ids)
    classes = np.full(int(task.corpus.ids.max()) + 1, -1, np.int64)
    classes[task.corpus.ids] = task.corpus.classes
    return class_relevance(top.ids, task.queries.classes, classes, task.exclude_self)


def evaluate_retrieval(
    strategy: Strategy,
    task: RetrievalTask,
    query: Tower,
    corpus: Tower,
    chunk: int = 4096,
    index: str | None = None,
) -> dict[str, Any]:
    """recall@k, hit rate@k, mAP@100 and NDCG@10 over the whole corpus, the same on every
    process, with the corpus size and the seconds it took. ``index="faiss"``: also an HNSW
    index's recall@10 against the exact search and both searches' queries per second (over
    embedded vectors, in each process)."""
    t0 = time.perf_counter()
    queries = embed_rows(query, task.queries.features)  # every process embeds all queries
    top = search(strategy, task, queries, corpus, chunk)
    metrics = ranking_metrics(*relevance(task, top))
    metrics["corpus"] = float(len(task.corpus.ids))
    metrics["seconds"] = time.perf_counter() - t0
    if index is not None:
        metrics.update(_compare_index(strategy, task, queries, corpus, top, chunk))
    return metrics


def _compare_index(
    strategy: Strategy,
    task: RetrievalTask,
    queries: np.ndarray,
    corpus: Tower,
    top: TopK,
    chunk: int,
) -> dict[str, float]:
    vectors = embed_rows(corpus, task.corpus.features)
    own = task.queries.ids if task.exclude_self else None
    exact = ExactTopK(strategy, queries, DEPTH, corpus.similarity, own)
    t0 = time.perf_counter()
    exact.search(ids_dataset_fn(vectors, task.corpus.ids, chunk))
    exact_qps = len(queries) / (time.perf_counter() - t0)
    out = approximate_recall(queries, vectors, task.corpus.ids, corpus.similarity, top.ids, own)
    return {**out, "exact_queries_per_second": exact_qps}
