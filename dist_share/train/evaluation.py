"""`Evaluator`: one pass over the eval split, reduced over every replica; `score`: one batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from dist_share.data.pipeline import check_element_spec
from dist_share.data.types import DatasetFn
from dist_share.errors import DataError
from dist_share.model.calibration import calibrate
from dist_share.train.state import TrainState

if TYPE_CHECKING:
    from dist_share.families.build import ModelSpec


class Evaluator:
    """Mean loss and metrics over the eval split, the same on every process.

    Hooks: ``eval_begin``, ``eval_step``, ``eval_end`` (orbit's names).

    Args:
        state: whose model is evaluated.
        eval_batches: stop after this many batches per input pipeline; None: the whole split.
        extra: more metrics after each pass, from the model and its stream names (retrieval
            over the whole split, `run.retrieval.RetrievalPass`); every process calls it.
    """

    def __init__(
        self,
        state: TrainState,
        eval_batches: int | None = None,
        extra: Callable[[Any, list[str]], dict[str, float]] | None = None,
    ) -> None:
        self.state = state
        self.strategy = state.strategy
        self.eval_batches = eval_batches
        self.extra = extra
        self._eval_fn = None
        self._count = 0.0
        # The last pass's time and throughput, logged beside its metrics (not among them: they
        # differ from run to run).
        self.timing: dict[str, float] = {}

    def _replica_eval_step(self, features: Any, labels: tf.Tensor) -> tuple[dict, tuple]:
        """(summed loss, metrics and count; the pairs' distances and labels, for calibration)"""
        # A replica past the end of the split gets zero rows (and still takes part in the step's
        # collectives). TensorFlow's oneDNN convolution returns the wrong shape for an empty
        # batch, so the model sees one row of zeros instead, and its output is cut to none.
        rows = tf.shape(tf.nest.flatten(features)[0])[0]
        inputs = tf.nest.map_structure(lambda t: _one_row_if_empty(t, rows), features)
        preds = self.state.spec.model(inputs, training=False)
        preds = tf.nest.map_structure(lambda p: p[:rows], preds)
        sums = score(self.state.spec, labels, preds)[1]
        if not self.state.spec.calibrates:
            return sums, ()
        return sums, (tf.reshape(preds, [-1]), tf.reshape(tf.cast(labels, tf.float32), [-1]))

    def eval_begin(self) -> dict[str, float]:
        if self._eval_fn is None:
            strategy = self.strategy

            @tf.function(reduce_retracing=True)
            def eval_fn(batch: Any) -> Any:
                sums, pairs = strategy.run(self._replica_eval_step, batch)
                return strategy.eval_sum(sums), tuple(strategy.eval_gather(t) for t in pairs)

            self._eval_fn = eval_fn
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        return {}

    def eval_step(self, batch: Any, state: dict[str, float]) -> dict[str, float]:
        sums, pairs = self._eval_fn(batch)
        for k, v in sums.items():
            state[k] = state.get(k, 0.0) + float(v)
        if pairs:
            self._pairs.append(tuple(np.asarray(t) for t in pairs))
        return state

    def eval_end(self, state: dict[str, float]) -> dict[str, float]:
        state = self.strategy.allreduce_host_sum(state)
        count = self._count = state.pop("count", 0.0)
        if not count:
            raise DataError("evaluation saw no examples (empty eval split or eval_batches=0)")
        metrics = {k: v / count for k, v in state.items()}
        if self._pairs:
            # Every process gathered every pair: each computes the same calibration.
            distances, same = (np.concatenate(t) for t in zip(*self._pairs, strict=True))
            metrics.update(calibrate(distances, same))
            threshold = self.state.spec.threshold
            if threshold is not None and "calibrated_threshold" in metrics:
                # Used by pair_accuracy from the next evaluation on (and saved with the model).
                threshold.assign(metrics["calibrated_threshold"])
        return metrics

    def evaluate(self, eval_dataset_fn: DatasetFn) -> dict[str, float]:
        """One pass over the split; every process must call it (it reduces across them)."""
        limit = self.eval_batches
        names = self.state.spec.stream_names

        def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = eval_dataset_fn(ctx)
            check_element_spec(ds.element_spec, names)
            return ds.take(limit) if limit is not None else ds

        t0 = time.perf_counter()
        self.strategy.sync_non_trainable(self.state.model.non_trainable_variables)
        state = self.eval_begin()
        for batch in self.strategy.in_lockstep(self.strategy.distribute_dataset(fn)):
            state = self.eval_step(batch, state)
        metrics = self.eval_end(state)
        if self.extra is not None:
            metrics.update(self.extra(self.state.model, list(names)))
        seconds = time.perf_counter() - t0
        self.timing = {"seconds": seconds, "examples_per_sec": self._count / max(seconds, 1e-9)}
        return metrics


def _one_row_if_empty(t: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    inner = t.shape[1:]  # static where known, so the model sees the shapes it was built for
    shape = [1, *inner] if inner.is_fully_defined() else tf.concat([[1], tf.shape(t)[1:]], 0)
    zeros = tf.zeros(shape, t.dtype)
    return tf.cond(rows > 0, lambda: t, lambda: zeros)


def score(spec: ModelSpec, labels: tf.Tensor, preds: Any, per_example: Any = None) -> tuple:
    """(per-example loss, {loss, metrics and count summed}) of a batch's predictions.

    ``per_example``: the loss values if already computed (a loss that gathers across replicas
    must not run twice: each run is a collective).
    """
    if per_example is None:
        per_example = spec.loss(labels, preds)
    per_example = tf.cast(per_example, tf.float32)
    sums = {"loss": tf.reduce_sum(per_example)}
    for name, fn in spec.metrics.items():
        sums[name] = tf.reduce_sum(tf.cast(fn(labels, preds), tf.float32))
    sums["count"] = tf.cast(tf.shape(per_example)[0], tf.float32)
    return per_example, sums
