"""How well pair distances separate same from different: ROC AUC, equal-error rate, best threshold."""

from __future__ import annotations

import numpy as np


def calibrate(distances: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """Calibration of "same when the distance is below a threshold" on labelled pairs.

    Returns:
        ``roc_auc``: the chance that a same pair is closer than a different one (ties half);
        ``eer``: the error rate where false accepts equal false rejects (their mean at the
        threshold where they are closest), at ``eer_threshold``; ``calibrated_threshold``:
        the threshold with the highest accuracy on these pairs, halfway between the two
        distances it separates, and that accuracy, ``calibrated_accuracy``. Without both
        kinds of pair there is nothing to calibrate: an empty dict.
    """
    d = np.asarray(distances, np.float64).reshape(-1)
    y = np.asarray(same).reshape(-1) > 0.5
    n_same, n_diff = int(y.sum()), int((~y).sum())
    if not n_same or not n_diff:
        return {}
    order = np.argsort(d, kind="stable")
    d, y = d[order], y[order]
    # Cuts between distinct distances: "same" for the first i pairs, i = 0 ... n.
    distinct = np.flatnonzero(np.diff(d) > 0) + 1
    cuts = np.concatenate([[0], distinct, [len(d)]])
    same_below = np.concatenate([[0], np.cumsum(y)])[cuts]
    diff_below = np.concatenate([[0], np.cumsum(~y)])[cuts]
    accuracy = (same_below + (n_diff - diff_below)) / len(d)
    false_accept = diff_below / n_diff
    false_reject = (n_same - same_below) / n_same

    def threshold_at(i: int) -> float:
        cut = cuts[i]
        if cut == 0:
            return float(d[0])  # nothing is below the smallest distance
        if cut == len(d):
            return float(d[-1]) + 1.0
        return float((d[cut - 1] + d[cut]) / 2)

    best = int(np.argmax(accuracy))
    equal = int(np.argmin(np.abs(false_accept - false_reject)))
    # Mann-Whitney: pairs (same, different) with the same pair closer, ties counted half.
    ranks = _average_ranks(d)
    auc = (ranks[~y].sum() - n_diff * (n_diff + 1) / 2) / (n_same * n_diff)
    return {
        "roc_auc": float(auc),
        "eer": float((false_accept[equal] + false_reject[equal]) / 2),
        "eer_threshold": threshold_at(equal),
        "calibrated_threshold": threshold_at(best),
        "calibrated_accuracy": float(accuracy[best]),
    }


def _average_ranks(sorted_values: np.ndarray) -> np.ndarray:
    """1-based ranks of ascending values, ties given their mean rank."""
    n = len(sorted_values)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_values) > 0) + 1, [n]])
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if b - a > 1:
            ranks[a:b] = (a + 1 + b) / 2
    return ranks
