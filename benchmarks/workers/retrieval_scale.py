"""Retrieval-scale worker: one exact top-k search over a generated corpus, or one embed pass.

argv: OUT_DIR search METHOD CORPUS [--queries Q] [--dim D] [--chunk C]
      OUT_DIR faiss CORPUS [--queries Q] [--dim D]
      OUT_DIR embed RUN_DIR ROWS [--repeats R]

* ``search``: the top 100 of Q queries over CORPUS generated vectors (dimension D, chunk by
  chunk from a seed: the corpus is never held whole), by ``dist_share`` (`retrieval.topk`,
  one process) or ``numpy`` (the same chunks: a matrix product, ``argpartition`` and a merge).
  Reports seconds, seconds per query, and the process's peak RSS (one search per process).
* ``faiss``: an HNSW index over CORPUS vectors: its recall@10 against the exact search and both
  searches' queries per second.
* ``embed``: rows per second of `dist-share embed`'s writer (`retrieval.embed.embed_parts`,
  parts written included) and of Keras ``model.predict`` on the same tower and rows,
  alternated R times.

Writes ``retrieval_scale.json``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.workers.wlib import write_result

K = 100


def chunk(index, corpus: int, size: int, dim: int):
    """Chunk ``index`` of a generated corpus: ``(vectors, ids)``, the same in a graph and
    eagerly (TensorFlow's stateless normal, seeded by the chunk's index)."""
    import tensorflow as tf

    start = tf.cast(index, tf.int64) * size
    rows = tf.minimum(tf.cast(size, tf.int64), corpus - start)
    seed = tf.stack([tf.constant(7, tf.int64), tf.cast(index, tf.int64)])
    vectors = tf.random.stateless_normal(tf.stack([rows, dim]), seed=seed)
    return vectors, tf.range(start, start + rows)


def corpus_chunks(corpus: int, size: int, dim: int):
    for i in range(-(-corpus // size)):
        vectors, ids = chunk(i, corpus, size, dim)
        yield vectors.numpy(), ids.numpy()


def queries_of(q: int, dim: int) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((q, dim), np.float32)


def numpy_search(queries: np.ndarray, corpus: int, chunk: int, dim: int) -> np.ndarray:
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for vectors, ids in corpus_chunks(corpus, chunk, dim):
        s = np.concatenate([best_s, queries @ vectors.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        keep = np.argpartition(-s, min(K, s.shape[1] - 1), axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_i, order, 1)


def generated(corpus: int, size: int, dim: int):
    """The corpus as a dataset function of ``(vectors, ids)`` chunks, generated as read."""
    import tensorflow as tf

    # Built once (its map function traced once), read by each search.
    chunks = tf.data.Dataset.range(-(-corpus // size))
    dataset = chunks.map(lambda i: chunk(i, corpus, size, dim)).prefetch(2)
    return lambda ctx=None: dataset


def ours(queries: np.ndarray):
    from dist_share.distribute.strategies import get_strategy
    from dist_share.retrieval.topk import ExactTopK

    return ExactTopK(get_strategy(), queries, K, "dot")


def search(args: argparse.Namespace) -> dict:
    queries = queries_of(args.queries, args.dim)
    warm_up = min(args.corpus, args.chunk + args.chunk // 2)  # a full chunk and a partial one
    if args.method == "dist_share":
        searcher = ours(queries)
        searcher.search(generated(warm_up, args.chunk, args.dim))  # traces its functions
        corpus_fn = generated(args.corpus, args.chunk, args.dim)
        t0 = time.perf_counter()
        ids = searcher.search(corpus_fn).ids
    else:
        numpy_search(queries, warm_up, args.chunk, args.dim)
        t0 = time.perf_counter()
        ids = numpy_search(queries, args.corpus, args.chunk, args.dim)
    seconds = time.perf_counter() - t0
    return {
        "method": args.method,
        "corpus": args.corpus,
        "queries": args.queries,
        "seconds": seconds,
        "ms_per_query": 1000 * seconds / args.queries,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "top10_checksum": int(ids[:, :10].sum()),
    }


def faiss_compare(args: argparse.Namespace) -> dict:
    from dist_share.retrieval.approximate import approximate_recall

    queries = queries_of(args.queries, args.dim)
    vectors = np.concatenate([v for v, _ in corpus_chunks(args.corpus, 65536, args.dim)])
    ids = np.arange(args.corpus, dtype=np.int64)
    searcher = ours(queries)
    searcher.search(generated(min(args.corpus, 98304), 65536, args.dim))  # traces
    corpus_fn = generated(args.corpus, 65536, args.dim)
    t0 = time.perf_counter()
    exact = searcher.search(corpus_fn).ids
    exact_qps = args.queries / (time.perf_counter() - t0)
    out = approximate_recall(queries, vectors, ids, "dot", exact)
    return {"corpus": args.corpus, "queries": args.queries, "exact_queries_per_second": exact_qps,
            **out}  # fmt: skip


def embed_throughput(args: argparse.Namespace) -> dict:
    from dist_share.retrieval.corpus import array_parts
    from dist_share.retrieval.embed import embed_parts
    from dist_share.run.export import tower_description
    from dist_share.run.restored import ONE_PROCESS, RestoredRun

    restored = RestoredRun(Path(args.run_dir), "embed", ONE_PROCESS)
    tower = restored.tower("right")
    rng = np.random.default_rng(0)
    x = rng.random((args.rows, 8, 8, 1), np.float32)
    ids = np.arange(args.rows, dtype=np.int64)
    batch = 1024
    model = tower.model
    embed_rates, predict_rates = [], []
    for repeat in range(args.repeats + 1):  # the first of each is a warm-up
        out = Path(tempfile.mkdtemp(prefix="bench_embed_"))
        try:
            parts = array_parts({"right": x}, ids, None, 65536)
            t0 = time.perf_counter()
            embed_parts(restored.strategy, lambda f: model(f, training=False), parts,
                        out / "emb", {"repeat": repeat}, tower_description(restored, tower),
                        batch)  # fmt: skip
            embed_rates.append(args.rows / (time.perf_counter() - t0))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        model.predict({"right": x}, batch_size=batch, verbose=0)
        predict_rates.append(args.rows / (time.perf_counter() - t0))
    embed_rates, predict_rates = embed_rates[1:], predict_rates[1:]
    return {
        "rows": args.rows,
        "batch": batch,
        "embed_rows_per_second": float(np.median(embed_rates)),
        "predict_rows_per_second": float(np.median(predict_rates)),
        "ratio": float(np.median(np.array(embed_rates) / np.array(predict_rates))),
        "embed_all": embed_rates,
        "predict_all": predict_rates,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir", type=Path)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("search")
    s.add_argument("method", choices=("dist_share", "numpy"))
    s.add_argument("corpus", type=int)
    f = sub.add_parser("faiss")
    f.add_argument("corpus", type=int)
    for q in (s, f):
        q.add_argument("--queries", type=int, default=1000)
        q.add_argument("--dim", type=int, default=64)
        q.add_argument("--chunk", type=int, default=8192)
    e = sub.add_parser("embed")
    e.add_argument("run_dir")
    e.add_argument("rows", type=int)
    e.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    run = {"search": search, "faiss": faiss_compare, "embed": embed_throughput}[args.what]
    write_result(args.out_dir, "retrieval_scale", run(args))


if __name__ == "__main__":
    main()
