"""Retrieval metrics over lists of relevant ids (two-tower), by hand on a small case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_share.retrieval.metrics import ranking_metrics, set_relevance
from dist_share.retrieval.topk import NO_ID


def test_listed_relevance_by_hand() -> None:
    top = np.array([[5, 3, 9, NO_ID], [1, 2, 4, 7], [8, 8, 8, 8]])
    offsets = np.array([0, 2, 3, 3])  # query 0: {3, 7}; query 1: {4}; query 2: none
    relevant_ids = np.array([3, 7, 4])
    hits, counts = set_relevance(top, offsets, relevant_ids)
    np.testing.assert_array_equal(hits[:2], [[0, 1, 0, 0], [0, 0, 1, 0]])
    out = ranking_metrics(hits, counts)
    assert out["queries"] == 2 and out["queries_without_relevant"] == 1
    assert out["recall@1"] == 0.0
    assert out["recall@5"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["hit_rate@5"] == 1.0
    assert out["map@100"] == pytest.approx(((1 / 2) / 2 + (1 / 3) / 1) / 2)
    ideal0 = 1 + 1 / math.log2(3)
    assert out["ndcg@10"] == pytest.approx(((1 / math.log2(3)) / ideal0 + (1 / 2) / 1) / 2)
