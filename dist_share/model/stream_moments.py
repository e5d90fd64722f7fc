"""Batch moments per stream over the global batch, for every stream at once in one all-reduce.

Both batch normalisations (`blocks.norm.StreamBatchNormalization`,
`folding.FoldedBatchNormalization`) take their statistics here, so neither folding nor the split
of the batch across replicas and processes changes them (docs/TOWERS.md).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dist_share.model.cross_replica import ReplicaGroup, current_group, local_only


def replica_group(sync: bool) -> ReplicaGroup:
    """The replicas whose rows make up the batch: the step's (`current_group`), or this one."""
    if sync:
        return current_group()
    with local_only():
        return current_group()


def stream_moments(
    xs: Any,
    stream_axis: int,
    channel_axis: int,
    shift: Any,
    sync: bool = True,
    mask: Any = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and (biased) variance of every stream and channel over the global batch.

    Each replica takes, per stream and channel, its count, its sum, its sum of squared
    deviations from its own mean (two passes, as ``tf.nn.moments``) and ``n * (mean - shift)^2``
    ; the four are packed into one tensor and summed over the replicas with one `all_sum`,
    whose gradient is the sum over replicas, so the gradients through the moments are those of
    ordinary batch normalisation on the global batch. The global variance adds the spread of
    the replicas' means, ``sum_r n_r (m_r - shift)^2 - N (m - shift)^2``, which with one
    replica is exactly zero (the same operations on the same numbers): one replica computes
    what ``tf.nn.moments`` computes, and several differ from it only by that spread's rounding.

    Args:
        xs: the batch with a stream axis, e.g. ``[k, B, ..., C]`` or ``[B, k, ..., C]``.
        stream_axis: the stream axis of `xs` (before `channel_axis`).
        channel_axis: the axis the statistics are kept per (non-negative).
        shift: ``[C]``, the same on every replica (the moving mean), about which the replicas'
            means are compared: near the mean, their spread does not cancel away. No gradient.
        sync: False takes the moments over this replica's rows only.
        mask: weights broadcastable to `xs` (1 counts the element, 0 leaves it out), or None.

    Returns:
        ``(mean, variance)``, each ``[k, C]``. A stream with no counted element gets mean and
        variance 0, as ``keras.layers.BatchNormalization`` gives a fully masked batch.
    """
    if not 0 <= stream_axis < channel_axis:
        raise ValueError(f"stream_axis {stream_axis} must come before channel_axis {channel_axis}")
    rank = len(xs.shape)
    axes = [a for a in range(rank) if a not in (stream_axis, channel_axis)]
    centre = tf.reshape(tf.stop_gradient(tf.cast(shift, xs.dtype)), [1, -1])
    if mask is None:
        weights = None
        total = tf.reduce_sum(xs, axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(xs), axes)), xs.dtype)
        count = tf.fill(tf.shape(total), count)
    else:
        weights = tf.broadcast_to(tf.cast(mask, xs.dtype), tf.shape(xs))
        total = tf.reduce_sum(xs * weights, axes)
        count = tf.reduce_sum(weights, axes)
    local_mean = tf.stop_gradient(tf.math.divide_no_nan(total, count))
    for a in axes:  # back to xs's rank, to broadcast
        local_mean = tf.expand_dims(local_mean, a)
    deviation = xs - local_mean
    if weights is not None:
        deviation = deviation * weights
    squares = tf.reduce_sum(tf.square(deviation), axes)
    spread = tf.math.divide_no_nan(tf.square(total - count * centre), count)
    packed = tf.stack([count, total, squares, spread])
    count, total, squares, spread = tf.unstack(replica_group(sync).all_sum(packed))
    spread = spread - tf.math.divide_no_nan(tf.square(total - count * centre), count)
    mean = tf.math.divide_no_nan(total, count)
    variance = tf.maximum(tf.math.divide_no_nan(squares + spread, count), 0.0)
    return mean, variance


def after_updates(moving: Any, stats: Any, momentum: float) -> tf.Tensor:
    """A moving average after one update per row of `stats` (``[k, C]``), in row order.

    ``m <- m * mom^k + sum_i (1 - mom) * mom^(k-1-i) * stats_i``: what k consecutive
    ``m <- m * mom + stats_i * (1 - mom)`` updates give, in one op.
    """
    k = int(stats.shape[0])
    weights = tf.constant(
        [[(1.0 - momentum) * momentum ** (k - 1 - i)] for i in range(k)], stats.dtype
    )
    moving = tf.cast(moving, stats.dtype)
    return moving * momentum**k + tf.reduce_sum(tf.stop_gradient(stats) * weights, axis=0)
