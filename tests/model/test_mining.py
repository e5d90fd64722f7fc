"""Mined triplets and pairs equal their formulas on hand-made batches (one replica here; the
split across replicas is tests/model/test_cross_replica.py's)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_share.model.losses import ContrastiveLoss, TripletLoss
from dist_share.model.metrics import InBatchRecallAt1
from dist_share.model.mining import anchor_distances

# Points on a line (1-D embeddings), two classes: distances are differences, picks are visible.
POINTS = np.array([[0.0], [1.0], [5.0], [2.0], [10.0]], np.float32)
CLASSES = np.array([0, 0, 0, 1, 1], np.int32)


def _distances(x: np.ndarray) -> np.ndarray:
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) + 1e-9)


def reference_triplets(x: np.ndarray, y: np.ndarray, margin: float, mining: str) -> np.ndarray:
    """Per-anchor values by brute force, straight from the definitions."""
    d = _distances(x)
    out = np.zeros(len(x))
    for a in range(len(x)):
        pos = [p for p in range(len(x)) if y[p] == y[a] and p != a]
        neg = [n for n in range(len(x)) if y[n] != y[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            out[a] = max(0.0, max(d[a, pos]) - min(d[a, neg]) + margin)
            continue
        values = []
        for p in pos:
            farther = [d[a, n] for n in neg if d[a, n] > d[a, p]]
            chosen = min(farther) if farther else max(d[a, neg])
            values.append(max(0.0, d[a, p] - chosen + margin))
        out[a] = np.mean(values)
    return out


def test_batch_hard_takes_the_farthest_positive_and_the_nearest_negative() -> None:
    values = TripletLoss(margin=0.5, mining="batch_hard")(CLASSES, POINTS).numpy()
    # anchor 0: positives at 1 and 5 (farthest 5), negatives at 2 and 10 (nearest 2)
    assert values[0] == pytest.approx(5 - 2 + 0.5, abs=1e-5)
    # anchor 3 (class 1, at 2): its one positive is 10 (d 8), nearest negative 1 (d 1)
    assert values[3] == pytest.approx(8 - 1 + 0.5, abs=1e-5)
    np.testing.assert_allclose(
        values, reference_triplets(POINTS, CLASSES, 0.5, "batch_hard"), atol=1e-5
    )


def test_semi_hard_takes_the_nearest_negative_beyond_the_positive() -> None:
    values = TripletLoss(margin=0.5, mining="semi_hard")(CLASSES, POINTS).numpy()
    # anchor 0: positive 1 (d 1) -> negative 2 (d 2 > 1): relu(1 - 2 + .5) = 0;
    #           positive 5 (d 5) -> negative 10 (d 10 > 5): relu(5 - 10 + .5) = 0
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    # anchor 2 (at 5): positive 0 (d 5) has no negative beyond 5 (2 is at 3, 10 at 5), so it
    # takes the farthest: relu(5 - 5 + .5) = .5; positive 1 (d 4) -> 10 (d 5): relu(4 - 5 + .5) = 0
    assert values[2] == pytest.approx((0.5 + 0.0) / 2, abs=1e-5)
    np.testing.assert_allclose(
        values, reference_triplets(POINTS, CLASSES, 0.5, "semi_hard"), atol=1e-5
    )


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_mined_triplets_equal_brute_force_on_random_batches(mining: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = rng.integers(0, 4, 24).astype(np.int32)
    values = TripletLoss(margin=1.0, mining=mining)(y, x).numpy()
    np.testing.assert_allclose(values, reference_triplets(x, y, 1.0, mining), atol=1e-5)


def test_an_anchor_without_a_positive_contributes_nothing_and_gradients_are_finite() -> None:
    x = tf.constant(np.array([[0.0], [0.0], [3.0]], np.float32))  # two identical points
    y = np.array([0, 0, 1], np.int32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        values = TripletLoss(margin=5.0, mining="batch_hard")(y, x)
        total = tf.reduce_sum(values)
    assert values.numpy()[2] == 0.0  # class 1 has one row: no positive
    assert values.numpy()[0] > 0.0
    assert np.isfinite(tape.gradient(total, x).numpy()).all()  # zero distances included


def test_contrastive_batch_hard_pulls_the_farthest_positive_and_pushes_the_nearest_negative() -> (
    None
):
    values = ContrastiveLoss(margin=3.0, mining="batch_hard")(CLASSES, POINTS).numpy()
    # anchor 0: farthest positive 5 -> 25; nearest negative 2 -> (3 - 2)^2 = 1
    assert values[0] == pytest.approx(25 + 1, abs=1e-4)
    # anchor 4 (class 1, at 10): positive at 2 (d 8) -> 64; nearest negative 5 (d 5) -> 0
    assert values[4] == pytest.approx(64, abs=1e-4)


def test_recall_at_1_is_whether_the_nearest_other_row_has_the_class() -> None:
    hits = InBatchRecallAt1()(CLASSES, POINTS).numpy()
    # 0 -> 1 (same), 1 -> 0 (same), 5 -> 2 (at 2, other), 2 -> 1 (other), 10 -> 5 (other)
    np.testing.assert_array_equal(hits, [1, 1, 0, 0, 0])


def test_a_row_is_never_its_own_positive() -> None:
    _, positives, negatives = anchor_distances(POINTS, CLASSES)
    assert not np.diag(positives.numpy()).any()
    assert not (positives.numpy() & negatives.numpy()).any()


def test_mining_couples_rows_and_pre_made_tuples_do_not() -> None:
    assert TripletLoss(mining="batch_hard").couples_rows
    assert not TripletLoss().couples_rows
    assert ContrastiveLoss(mining="batch_hard").couples_rows
    assert not ContrastiveLoss().couples_rows
