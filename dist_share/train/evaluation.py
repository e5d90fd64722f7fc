"""`Evaluator`: one pass over the eval split, reduced over every replica; `forward`: one batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tensorflow as tf

from dist_share.data.pipeline import check_element_spec
from dist_share.data.types import DatasetFn
from dist_share.errors import DataError
from dist_share.train.state import TrainState

if TYPE_CHECKING:
    from dist_share.families.build import ModelSpec


class Evaluator:
    """Mean loss and metrics over the eval split, the same on every process.

    Hooks: ``eval_begin``, ``eval_step``, ``eval_end`` (orbit's names).

    Args:
        state: whose model is evaluated.
        eval_batches: stop after this many batches per input pipeline; None: the whole split.
    """

    def __init__(self, state: TrainState, eval_batches: int | None = None) -> None:
        self.state = state
        self.strategy = state.strategy
        self.eval_batches = eval_batches
        self._eval_fn = None

    def _replica_eval_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        return forward(self.state.spec, features, labels, training=False)[1]

    def eval_begin(self) -> dict[str, float]:
        if self._eval_fn is None:

            @tf.function(reduce_retracing=True)
            def eval_fn(batch: Any) -> Any:
                return self.strategy.eval_sum(self.strategy.run(self._replica_eval_step, batch))

            self._eval_fn = eval_fn
        return {}

    def eval_step(self, batch: Any, state: dict[str, float]) -> dict[str, float]:
        for k, v in self._eval_fn(batch).items():
            state[k] = state.get(k, 0.0) + float(v)
        return state

    def eval_end(self, state: dict[str, float]) -> dict[str, float]:
        state = self.strategy.allreduce_host_sum(state)
        count = state.pop("count", 0.0)
        if not count:
            raise DataError("evaluation saw no examples (empty eval split or eval_batches=0)")
        return {k: v / count for k, v in state.items()}

    def evaluate(self, eval_dataset_fn: DatasetFn) -> dict[str, float]:
        """One pass over the split; every process must call it (it reduces across them)."""
        limit = self.eval_batches
        names = self.state.spec.stream_names

        def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = eval_dataset_fn(ctx)
            check_element_spec(ds.element_spec, names)
            return ds.take(limit) if limit is not None else ds

        self.strategy.sync_non_trainable(self.state.model.non_trainable_variables)
        state = self.eval_begin()
        for batch in self.strategy.distribute_dataset(fn):
            state = self.eval_step(batch, state)
        return self.eval_end(state)


def forward(spec: ModelSpec, features: Any, labels: tf.Tensor, training: bool) -> tuple:
    """(per-example loss, {loss, metrics and count summed over the batch}) of one batch."""
    preds = spec.model(features, training=training)
    per_example = tf.cast(spec.loss(labels, preds), tf.float32)
    sums = {"loss": tf.reduce_sum(per_example)}
    for name, fn in spec.metrics.items():
        sums[name] = tf.reduce_sum(tf.cast(fn(labels, preds), tf.float32))
    sums["count"] = tf.cast(tf.shape(per_example)[0], tf.float32)
    return per_example, sums
