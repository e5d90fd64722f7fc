"""How often each candidate is sampled into a batch: the streaming estimate behind logQ correction.

In-batch negatives are the other rows' candidates, so a popular item is a negative far more
often than its share of the catalogue. Yi et al. (2019, "Sampling-bias-corrected neural modeling
for large corpus item recommendations", algorithm 1) estimate each candidate's probability of
appearing in a batch from the steps between its appearances: after step t sees item y,

    interval[y] <- (1 - alpha) * interval[y] + alpha * (t - last_seen[y]);  last_seen[y] <- t

and p(y) = 1 / interval[y]. `CandidateFrequency` keeps both arrays (one slot per id of the
candidate table, so no hashing collisions) as non-trainable weights of the model: checkpointed
and restored with it, and identical on every replica because every replica updates them from
the ids of the *global* batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import tensorflow as tf

from dist_share.model.cross_replica import current_group
from dist_share.model.serialization import register
from dist_share.model.trace_flags import TraceFlag

_continuing = TraceFlag()


def same_step() -> contextlib.AbstractContextManager[None]:
    """Inside, a training forward belongs to the step already counted: a later micro-batch of
    the step, or GradCache's second forward of one (`train.loops.accumulate`)."""
    return _continuing.set()


@register
class CandidateFrequency(keras.layers.Layer):
    """The candidate ids pass through unchanged; a training forward counts them.

    Args:
        vocab_size: candidate ids are in ``[0, vocab_size)`` (the candidate table's rows).
        alpha: the weight of the newest interval in the moving average (Yi et al.'s alpha).

    Within one step the ids of every micro-batch are counted once, at the step's number, so the
    estimate after a step does not depend on how its batch was split into micro-batches.
    """

    def __init__(self, vocab_size: int, alpha: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.alpha = float(alpha)

    def build(self, input_shape: Any = None) -> None:
        # Every replica computes the same update from the global batch's ids, so the first
        # replica's value is everyone's (no averaging of identical values).
        common = {"trainable": False, "aggregation": "only_first_replica"}
        self.step = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", name="step", **common
        )
        self.last_seen = self.add_weight(
            shape=(self.vocab_size,), dtype="int64", initializer="zeros", name="last_seen", **common
        )
        self.interval = self.add_weight(
            shape=(self.vocab_size,),
            dtype="float32",
            initializer="zeros",
            name="interval",
            **common,
        )

    def call(self, ids: Any, training: bool | None = None) -> Any:
        if training:
            # Not a dependency of the output: the towers need not wait for the ids' gather.
            # TensorFlow runs the update anyway (a stateful op of the step), and orders it
            # before the loss reads the estimate (both touch the same variables).
            self.update(ids)
        return tf.identity(ids)

    def update(self, ids: Any) -> tf.Operation:
        """Count the global batch's ``ids`` (this replica's, gathered from every replica)."""
        seen = tf.unique(tf.reshape(current_group().gather_values(tf.cast(ids, tf.int64)), [-1]))[0]
        step = tf.convert_to_tensor(self.step)
        t = step if _continuing.on else step + 1
        last = tf.gather(self.last_seen, seen)
        old = tf.gather(self.interval, seen)
        elapsed = tf.cast(t - last, tf.float32)
        fresh = tf.where(last == 0, elapsed, (1.0 - self.alpha) * old + self.alpha * elapsed)
        new = tf.where(last == t, old, fresh)  # counted already in this step
        index = seen[:, None]
        return tf.group(
            self.interval.assign(tf.tensor_scatter_nd_update(self.interval, index, new)),
            self.last_seen.assign(
                tf.tensor_scatter_nd_update(self.last_seen, index, tf.fill(tf.shape(seen), t))
            ),
            self.step.assign(t),
        )

    def log_probability(self, ids: Any) -> tf.Tensor:
        """log p(id appears in a batch) = -log interval; 0 for an id never counted."""
        interval = tf.gather(tf.convert_to_tensor(self.interval), tf.cast(ids, tf.int64))
        return -tf.math.log(tf.maximum(interval, 1.0))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "vocab_size": self.vocab_size, "alpha": self.alpha}
