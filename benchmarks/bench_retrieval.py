"""Using the towers: exact retrieval as the corpus grows, an approximate index, embedding speed.

* ``search``: the exact top 100 of 1000 queries over 1e4, 1e5 and 1e6 generated candidates of
  dimension 64 (`retrieval.topk.ExactTopK`, one process), against a NumPy brute force over the
  same chunks (matrix product, ``argpartition``, merge). Each search runs in its own process,
  so its peak RSS is its own: the corpus streams through in chunks of 8192, never held whole.
* ``faiss``: an HNSW index (faiss-cpu, 32 neighbours, efSearch 64) over 1e5 candidates: its
  recall@10 against the exact search, and both searches' queries per second.
* ``embed``: rows per second of `dist-share embed`'s writer (parts written included) over
  Keras ``model.predict``, same tower (the digits siamese conv tower), rows and batch (1024).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, bench_main, run_worker, train_run

NAME = "retrieval"
# quick: (corpus sizes, queries, faiss corpus, embed rows, timeout)
SIZES = {
    False: ((10_000, 100_000, 1_000_000), 1000, 100_000, 200_000, 1200),
    True: ((2_000,), 50, 2_000, 2_000, 300),
}


def run(quick: bool = False) -> dict:
    corpora, queries, faiss_corpus, rows, timeout = SIZES[quick]
    search = []
    for corpus in corpora:
        for method in ("dist_share", "numpy"):
            args = ["search", method, str(corpus), "--queries", str(queries)]
            search.append(run_worker("retrieval_scale", args, timeout)[0])
    table = []
    for corpus in corpora:
        ours, ref = (next(r for r in search if r["corpus"] == corpus and r["method"] == m)
                     for m in ("dist_share", "numpy"))  # fmt: skip
        assert ours["top10_checksum"] == ref["top10_checksum"], "the two searches disagree"
        table.append({
            "corpus": corpus,
            "ms_per_query": ours["ms_per_query"],
            "numpy_ms_per_query": ref["ms_per_query"],
            "speedup_over_numpy": ref["ms_per_query"] / ours["ms_per_query"],
            "peak_rss_mib": ours["peak_rss_mib"],
            "numpy_peak_rss_mib": ref["peak_rss_mib"],
        })  # fmt: skip
    args = ["faiss", str(faiss_corpus), "--queries", str(queries)]
    approximate = run_worker("retrieval_scale", args, timeout)[0]
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        run_dir = Path(tmp) / "siamese"
        train_run(REPO / "configs" / "siamese_digits.yaml", run_dir, [], 2 if quick else 20,
                  timeout)  # fmt: skip
        embed = run_worker("retrieval_scale", ["embed", str(run_dir), str(rows)], timeout)[0]
    return {
        "name": NAME,
        "description": (
            f"One process, {queries} queries, top 100, dimension 64, candidates generated in "
            "chunks of 8192 (workers/retrieval_scale.py). ms_per_query: the whole search "
            "over the corpus, per query; speedup_over_numpy: NumPy's ms over ours; "
            "peak_rss_mib: the search process's peak resident memory (TensorFlow and the "
            f"queries included). faiss: HNSW (32, efSearch 64) over {faiss_corpus} "
            f"candidates: recall@10 {approximate['faiss_recall@10']:.3f} against the exact "
            f"top 10, {approximate['faiss_queries_per_second']:.0f} queries/s against exact "
            f"{approximate['exact_queries_per_second']:.0f} (build "
            f"{approximate['faiss_build_seconds']:.1f} s). embed: {rows} digit-sized rows "
            f"through the siamese conv tower, batch 1024: dist-share embed's writer "
            f"{embed['embed_rows_per_second']:.0f} rows/s, model.predict "
            f"{embed['predict_rows_per_second']:.0f} rows/s, ratio {embed['ratio']:.3f} "
            "(median of 3 alternated repeats after a warm-up)."
        ),
        "params": {"corpora": list(corpora), "queries": queries, "dim": 64, "k": 100},
        "search": search,
        "faiss": approximate,
        "embed": embed,
        "table": table,
        "plot": {"x": "corpus", "y": ["ms_per_query", "numpy_ms_per_query"], "title": NAME},
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
