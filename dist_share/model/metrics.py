"""Metrics that return one value per example (shape ``[batch]``), averaged by the caller.

Each is a registered `losses.PerExample` callable, computed in float32 like the losses.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from dist_share.model.cross_replica import current_group
from dist_share.model.losses import PerExample, pair_logits
from dist_share.model.mining import nearest_is_same_class
from dist_share.model.serialization import register


def _f32(x: Any) -> Any:
    return ops.cast(x, "float32")


@register
class PairAccuracy(PerExample):
    """Siamese: predicted 'same' when the distance is below ``threshold`` (a number, or a
    variable read at each call: `heads.DecisionThreshold`'s calibrated one)."""

    def __init__(self, threshold: Any = 0.5) -> None:
        self.threshold = threshold if hasattr(threshold, "assign") else float(threshold)

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        y = ops.reshape(_f32(y_true), (-1,)) > 0.5
        same = ops.reshape(_f32(y_pred), (-1,)) < _f32(self.threshold)
        return _f32(ops.equal(y, same))

    def get_config(self) -> dict:
        return {"threshold": float(ops.convert_to_numpy(self.threshold))}


@register
class TripletAccuracy(PerExample):
    """1 where d(anchor, positive) < d(anchor, negative)."""

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        d = _f32(y_pred)
        return _f32(d[:, 0] < d[:, 1])


@register
class ClassAccuracy(PerExample):
    """Multi-view classifier: argmax of the logits equals the label."""

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        y = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        return _f32(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y))


@register
class BinaryAccuracy(PerExample):
    """Two-tower: sigmoid(score) > 0.5 agrees with the 0/1 label."""

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        y = ops.reshape(_f32(y_true), (-1,)) > 0.5
        return _f32(ops.equal(pair_logits(y_pred) > 0.0, y))


@register
class InBatchTop1(PerExample):
    """Two-tower: row i's own candidate scores highest among the global batch's candidates.

    The candidates of every replica are gathered (`cross_replica.current_group`), so the value
    of a checkpoint does not depend on how the evaluation batch is split. A tie with the best
    counts as a hit (several rows may hold the same item): the first of tied candidates would
    depend on the order in which the replicas' rows are gathered.
    """

    couples_rows = True

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        p = _f32(y_pred)
        group = current_group()
        everyone, start = group.gather_rows(p[:, 1])
        logits = ops.matmul(p[:, 0], ops.transpose(everyone))
        own = start + ops.arange(ops.shape(logits)[0], dtype="int32")
        mine = ops.take_along_axis(logits, ops.expand_dims(own, 1), axis=1)[:, 0]
        return _f32(mine >= ops.max(logits, axis=-1))


@register
class InBatchRecallAt1(PerExample):
    """Single labelled items: the nearest other row of the global batch has the row's class.

    Gathered across replicas like `InBatchTop1`, so it does not depend on the batch's split; a
    tie between a same-class row and another counts as a hit.
    """

    couples_rows = True

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        return nearest_is_same_class(y_pred, y_true)
