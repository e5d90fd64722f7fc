"""Pair calibration: ROC AUC, the equal-error rate and the best-accuracy threshold."""

from __future__ import annotations

import numpy as np
import pytest

from dist_share.model.calibration import calibrate


def test_separable_scores_put_the_threshold_between_the_classes() -> None:
    rng = np.random.default_rng(0)
    same = rng.uniform(0.1, 0.4, 200)
    different = rng.uniform(0.6, 1.5, 300)
    out = calibrate(np.r_[same, different], np.r_[np.ones(200), np.zeros(300)])
    assert same.max() < out["calibrated_threshold"] < different.min()
    assert out["calibrated_accuracy"] == 1.0 and out["roc_auc"] == 1.0 and out["eer"] == 0.0
    assert same.max() < out["eer_threshold"] < different.min()


def test_overlapping_scores_match_the_textbook_definitions() -> None:
    rng = np.random.default_rng(1)
    d = np.round(np.r_[rng.normal(0.5, 0.3, 400), rng.normal(1.0, 0.3, 300)], 2)  # ties
    y = np.r_[np.ones(400), np.zeros(300)]
    out = calibrate(d, y)
    # AUC: P(a same pair is closer than a different one), ties half.
    closer = (d[y == 1][:, None] < d[y == 0][None, :]).mean()
    tied = (d[y == 1][:, None] == d[y == 0][None, :]).mean()
    assert out["roc_auc"] == pytest.approx(closer + tied / 2, abs=1e-12)
    # The best threshold: no threshold between the distances does better.
    candidates = np.r_[d.min() - 1, (np.sort(d)[1:] + np.sort(d)[:-1]) / 2, d.max() + 1]
    accuracy = [((d < t) == (y == 1)).mean() for t in candidates]
    assert out["calibrated_accuracy"] == pytest.approx(max(accuracy), abs=1e-12)
    t = out["calibrated_threshold"]
    assert ((d < t) == (y == 1)).mean() == pytest.approx(out["calibrated_accuracy"], abs=1e-12)
    # The equal-error rate: false accepts and false rejects meet there.
    e = out["eer_threshold"]
    far, frr = (d[y == 0] < e).mean(), (d[y == 1] >= e).mean()
    assert abs(far - frr) < 0.02 and out["eer"] == pytest.approx((far + frr) / 2, abs=1e-12)


def test_one_kind_of_pair_has_nothing_to_calibrate() -> None:
    assert calibrate(np.array([0.1, 0.2]), np.array([1.0, 1.0])) == {}
