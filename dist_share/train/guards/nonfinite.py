"""The non-finite guard (``training.on_nonfinite: stop | skip``), decided on the reduced gradient.

The reduced gradient is the same on every replica, so every replica takes the same branch. What
``stop`` and ``skip`` do, and why mixed precision watches the loss only: docs/RELIABILITY.md,
"Non-finite guard".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dist_share.errors import EXIT_NONFINITE, JobError

MODES = ("stop", "skip")


class NonFiniteError(JobError):
    """A non-finite loss or reduced gradient under ``on_nonfinite: stop`` (exit 4)."""

    exit_code = EXIT_NONFINITE


def _values(grad: Any) -> tf.Tensor:
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def first_nonfinite(grads: Sequence[Any]) -> tf.Tensor:
    """In graph: the index of the first gradient holding NaN/inf, or -1 if all are finite.

    Two ops per gradient and no conditional (this runs every step).
    """
    present = [(i, _values(g)) for i, g in enumerate(grads) if g is not None]
    if not present:
        return tf.constant(-1, tf.int32)
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(g)) for _, g in present])
    positions = tf.constant([i for i, _ in present], tf.int32)
    first = tf.gather(positions, tf.argmin(tf.cast(finite, tf.int32), output_type=tf.int32))
    return tf.where(tf.reduce_all(finite), tf.constant(-1, tf.int32), first)


def apply_if(optimizer: Any, grads: list[Any], variables: list[Any], ok: tf.Tensor) -> None:
    """``optimizer.apply(grads, variables)`` only where ``ok`` (the same on every replica).

    Under MirroredStrategy Keras's apply uses ``merge_call``, which a ``tf.cond`` in replica
    context cannot contain; as Keras's LossScaleOptimizer does, the condition is then taken in
    cross-replica context and the update re-entered per replica.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or tf.__internal__.distribute.strategy_supports_no_merge_call():

        def apply() -> tf.Tensor:
            optimizer.apply(grads, variables)
            return tf.constant(True)

        tf.cond(ok, apply, lambda: tf.constant(False))
        return

    def cross_replica(distribution: Any, grads: Any, variables: Any, ok: Any) -> None:
        decided = distribution.experimental_local_results(ok)[0]

        def apply() -> tf.Tensor:
            distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))
            return tf.constant(True)

        tf.cond(decided, apply, lambda: tf.constant(False))

    ctx.merge_call(cross_replica, args=(grads, variables, ok))


def describe(
    step: int,
    loss: float | None,
    variable: str | None,
    checkpoint: str | None,
    after_update: bool = False,
) -> str:
    """The message of `NonFiniteError`. ``after_update``: a variable (not its gradient) holds
    NaN/inf, found before saving it."""
    if after_update:
        what = f"variable {variable!r} (found before saving it)"
    elif variable is not None:
        what = (
            f"the reduced gradient of variable {variable!r} (the first of the model's variables "
            "with NaN/inf)"
        )
    else:
        what = "the loss"
    kept = (
        f"the newest checkpoint ({checkpoint}) holds finite values"
        if checkpoint
        else "there is no earlier checkpoint"
    )
    return (
        f"non-finite values at step {step}: {what} is not finite"
        + (f" (loss = {loss})" if loss is not None else "")
        + ". "
        + ("It was not saved" if after_update else "The run stopped there, saving nothing after it")
        + f"; {kept}. Lower optimizer.learning_rate (or set optimizer.clipnorm), "
        "check the input data, or set training.on_nonfinite: skip to skip such steps."
    )


def first_nonfinite_variable(variables: Sequence[Any]) -> str | None:
    """Host side: the path of the first variable holding NaN/inf, or None."""
    for v in variables:
        value = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return getattr(v, "path", getattr(v, "name", "?"))
    return None
