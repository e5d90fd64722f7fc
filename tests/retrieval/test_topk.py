"""Exact top-k and the retrieval metrics equal a NumPy brute-force reference, exact ties
included (higher score first, then lower id), on one replica, MirroredStrategy x2 and
horovodrun x2."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import WORKERS
from tests.helpers.processes import run_on_two_replicas
from tests.workers.retrieval_check import CLASSES, CORPUS, QUERIES, K, search_cases, small_corpus


def reference_ranking(queries: np.ndarray, corpus: np.ndarray, kind: str, exclude) -> tuple:
    """Every corpus item scored in float64, sorted by (-score, id): the documented order."""
    q, c = queries.astype(np.float64), corpus.astype(np.float64)
    scores = q @ c.T if kind == "dot" else -((q[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    ids, out_scores = [], []
    for i, row in enumerate(scores):
        keep = np.arange(len(c)) if exclude is None else np.delete(np.arange(len(c)), exclude[i])
        order = keep[np.lexsort((keep, -row[keep]))][:K]
        ids.append(order)
        out_scores.append(row[order])
    return np.array(ids), np.array(out_scores)


def reference_metrics(ids: np.ndarray, query_labels, labels, exclude_self: bool) -> dict:
    """The metrics' textbook definitions, one query at a time."""
    per = {}
    for q, ranked in enumerate(ids):
        rel = {i for i in range(CORPUS) if labels[i] == query_labels[q]}
        if exclude_self:
            rel.discard(int(QUERY_IDS[q]))
        if not rel:
            continue
        hits = [int(i) in rel for i in ranked]
        for k in (1, 5, 10, 100):
            per.setdefault(f"recall@{k}", []).append(sum(hits[:k]) / len(rel))
            per.setdefault(f"hit_rate@{k}", []).append(float(any(hits[:k])))
        ap = sum(sum(hits[: i + 1]) / (i + 1) for i in range(100) if hits[i])
        per.setdefault("map@100", []).append(ap / min(len(rel), 100))
        dcg = sum(1 / math.log2(i + 2) for i in range(10) if hits[i])
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10)))
        per.setdefault("ndcg@10", []).append(dcg / ideal)
    return {k: float(np.mean(v)) for k, v in per.items()}


DATA = small_corpus()
QUERY_IDS = DATA["gallery_queries"]


def check_cases(cases: dict) -> None:
    for name, got in cases.items():
        kind, which = name.split("_")
        gallery = which == "gallery"
        if gallery:
            queries, labels_q = DATA["corpus"][QUERY_IDS], DATA["labels"][QUERY_IDS]
        else:
            queries, labels_q = DATA["queries"], np.arange(QUERIES) % CLASSES
        ids, scores = reference_ranking(
            queries, DATA["corpus"], kind, QUERY_IDS if gallery else None
        )
        np.testing.assert_array_equal(np.array(got["ids"]), ids, err_msg=name)
        np.testing.assert_array_equal(np.array(got["scores"]), scores, err_msg=name)
        want = reference_metrics(ids, labels_q, DATA["labels"], gallery)
        for key, value in want.items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-12), (name, key)


def test_the_small_corpus_has_ties_across_the_kth_place() -> None:
    # The test can fail on order: at least one query has equal scores on both sides of a cut.
    _, scores = reference_ranking(DATA["queries"], DATA["corpus"], "dot", None)
    assert (scores[:, 4] == scores[:, 5]).any() and (scores[:, 9] == scores[:, 10]).any()


def test_one_replica_equals_numpy() -> None:
    from dist_share.distribute.strategies import get_strategy

    check_cases(search_cases(get_strategy()))


def test_chunk_size_does_not_change_the_result() -> None:
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy()
    assert search_cases(strategy, chunk=7) == search_cases(strategy, chunk=203)


def test_fewer_corpus_items_than_k_leaves_no_id() -> None:
    from dist_share.distribute.strategies import get_strategy
    from dist_share.retrieval.topk import NO_ID, ExactTopK, ids_dataset_fn

    corpus = DATA["corpus"][:3]
    top = ExactTopK(get_strategy(), DATA["queries"][:2], 5, "dot", np.array([1, -1])).search(
        ids_dataset_fn(corpus, np.arange(3), 2)
    )
    assert (top.ids[0, 2:] == NO_ID).all() and set(top.ids[0, :2]) == {0, 2}
    assert (top.ids[1, 3:] == NO_ID).all() and np.isneginf(top.scores[1, 3:]).all()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["mirrored", "horovod"])
def test_two_replicas_equal_numpy(launcher: str, tmp_path: Path) -> None:
    script = WORKERS / "retrieval_check.py"
    for result in run_on_two_replicas(script, launcher, tmp_path / "result", timeout=240):
        check_cases(result["cases"])
