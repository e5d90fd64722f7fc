"""Exact top-k over a corpus streamed in chunks: each replica scores its share, the shares merge once.

Memory is the queries, one chunk of the corpus and a running ``[queries, k]`` best list per
replica, whatever the corpus size. The order is documented (docs/RETRIEVAL.md): higher score
first; equal scores by lower id. It is exact because each replica sees its rows in ascending id
order (the corpus is dealt out chunk by chunk and read in order), so `tf.math.top_k`'s "lower
index first" among equal values is "lower id first", and the final merge sorts by (score, id).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from dist_share.data.types import DatasetFn
from dist_share.distribute.strategies import Strategy
from dist_share.model.cross_replica import current_group

# How a query and a corpus vector are compared; a larger score ranks first.
SIMILARITIES = ("dot", "l2")
NO_ID = np.iinfo(np.int64).max  # fills a result list the corpus could not fill


@dataclasses.dataclass(frozen=True)
class TopK:
    """The k best corpus ids of each query, best first, with their scores (``-inf``: none)."""

    scores: np.ndarray  # float32 [Q, k]
    ids: np.ndarray  # int64 [Q, k]


def similarity(queries: tf.Tensor, vectors: tf.Tensor, kind: str) -> tf.Tensor:
    """``[Q, C]`` scores: the dot product, or the negative squared Euclidean distance."""
    dots = tf.matmul(queries, vectors, transpose_b=True)
    if kind == "dot":
        return dots
    q2 = tf.reduce_sum(tf.square(queries), axis=1, keepdims=True)
    c2 = tf.reduce_sum(tf.square(vectors), axis=1)[None, :]
    return 2.0 * dots - q2 - c2


def merge_sorted(scores: np.ndarray, ids: np.ndarray, k: int) -> TopK:
    """The k best of each row of candidates in any order: by score, then by lower id."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return TopK(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1))


class ExactTopK:
    """Brute-force top-k of ``queries`` over a corpus, distributed over a strategy's replicas.

    Args:
        strategy: every process of the job calls `search` with the same queries.
        queries: float32 ``[Q, d]`` query vectors (every replica scores all of them).
        k: results per query.
        kind: one of `SIMILARITIES`.
        query_ids: ``[Q]`` the corpus id of each query, excluded from its own results (a
            gallery searched with its own items); None: nothing excluded.
        encode: maps a chunk's features to ``[C, d]`` vectors (a tower); None: the features
            are the vectors.
    """

    def __init__(
        self,
        strategy: Strategy,
        queries: np.ndarray,
        k: int,
        kind: str,
        query_ids: np.ndarray | None = None,
        encode: Callable[[Any], tf.Tensor] | None = None,
    ) -> None:
        if kind not in SIMILARITIES:
            raise ValueError(f"similarity {kind!r}: expected one of {SIMILARITIES}")
        self.strategy = strategy
        self.queries = tf.constant(np.asarray(queries, np.float32))
        self.k = int(k)
        self.kind = kind
        self.excludes = query_ids is not None
        ids = np.full(len(queries), -1) if query_ids is None else np.asarray(query_ids)
        self.query_ids = tf.constant(ids.astype(np.int64))
        self.encode = encode or (lambda features: features)
        # Traced once per instance (a search per evaluation re-uses them).
        self._start = tf.function(self._empty)
        self._step = tf.function(
            lambda best, chunk: strategy.run(self._update, (best, *chunk)), reduce_retracing=True
        )
        self._finish = tf.function(self._gather)

    def _empty(self) -> tuple[tf.Tensor, tf.Tensor]:
        q = tf.shape(self.queries)[0]
        return (
            tf.fill([q, self.k], tf.constant(-np.inf, tf.float32)),
            tf.fill([q, self.k], tf.constant(NO_ID, tf.int64)),
        )

    def _update(self, best: tuple, features: Any, ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        best_scores, best_ids = best

        def scored() -> tuple[tf.Tensor, tf.Tensor]:
            vectors = tf.cast(self.encode(features), tf.float32)
            scores = similarity(self.queries, vectors, self.kind)
            if self.excludes:
                own = tf.equal(self.query_ids[:, None], ids[None, :])
                scores = tf.where(own, tf.constant(-np.inf, tf.float32), scores)
            # Running best first: its ids are lower than the chunk's (see the module docstring).
            top, where = tf.math.top_k(tf.concat([best_scores, scores], axis=1), k=self.k)
            # Positions below k are the running list's, the others the chunk's (no [Q, C] id
            # matrix is built).
            kept = tf.gather(best_ids, tf.minimum(where, self.k - 1), batch_dims=1)
            new = tf.gather(ids, tf.maximum(where - self.k, 0))
            return top, tf.where(where < self.k, kept, new)

        # A replica past the end of its share gets zero rows: keep what it has.
        return tf.cond(tf.size(ids) > 0, scored, lambda: (best_scores, best_ids))

    def _gather(self, best: tuple) -> tuple[tf.Tensor, tf.Tensor]:
        """Every replica's best lists, ``[R * Q, k]`` replica-major. They are rearranged and
        merged on the host: an int64 transpose or sort in a graph makes oneDNN log an error
        line on CPUs without AVX-512."""
        group = current_group()
        return group.gather_values(best[0]), group.gather_values(best[1])

    def search(self, corpus_fn: DatasetFn) -> TopK:
        """The exact top-k over the corpus ``corpus_fn`` yields as ``(features, ids)`` chunks.

        ``corpus_fn(ctx)`` must give each input pipeline its share of the rows in ascending id
        order, batched per replica (`ids_dataset_fn` does). Every process gets the same result.
        """
        strategy = self.strategy
        best = strategy.run(self._start)
        for chunk in strategy.distribute_dataset(corpus_fn):
            best = self._step(best, chunk)
        gathered = strategy.local_results(strategy.run(self._finish, (best,)))[0]
        q = len(self.queries)
        if len(gathered[0]) == q:  # one replica: top_k already ordered it by (score, id)
            return TopK(gathered[0].numpy(), gathered[1].numpy())

        def per_query(t: tf.Tensor) -> np.ndarray:  # [R*Q, k] -> [Q, R*k]
            return t.numpy().reshape(-1, q, self.k).transpose(1, 0, 2).reshape(q, -1)

        return merge_sorted(*(per_query(t) for t in gathered), self.k)


def ids_dataset_fn(
    features: Any, ids: np.ndarray, chunk: int
) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
    """A corpus of in-memory rows as ``(features, ids)`` chunks of ``chunk`` rows, each input
    pipeline taking every n-th chunk (ids must ascend)."""
    ids = np.asarray(ids, np.int64)
    count = -(-len(ids) // chunk)

    def fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        rows = tf.nest.map_structure(tf.constant, (features, ids))

        def take(i: tf.Tensor) -> Any:  # a slice of the arrays: no per-row work
            return tf.nest.map_structure(lambda t: t[i * chunk : (i + 1) * chunk], rows)

        ds = tf.data.Dataset.range(count)
        if ctx is not None and ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.map(take).prefetch(2)

    return fn
