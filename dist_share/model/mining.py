"""Triplets and pairs chosen inside the global batch from class labels: batch-hard and semi-hard.

Each replica mines for its own rows (the anchors) among every replica's rows (the candidates,
gathered with `cross_replica.current_group`), so an anchor sees the same positives and negatives
however the global batch is split. Distances are Euclidean, as the l2 heads compute them
(``sqrt(squared + 1e-9)``: finite gradients at zero distance).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dist_share.model.cross_replica import current_group

MINING = ("none", "batch_hard", "semi_hard")
_EPSILON = 1e-9


def anchor_distances(embeddings: Any, labels: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(distances [b, N], positive mask [b, N], negative mask [b, N]) of this replica's b rows
    to the N rows of the global batch. A row is not its own positive."""
    e = tf.cast(embeddings, tf.float32)
    y = tf.reshape(tf.cast(labels, tf.int32), [-1])
    group = current_group()
    everyone, start = group.gather_rows(e)
    classes = group.gather_values(y)
    squared = (
        tf.reduce_sum(tf.square(e), -1, keepdims=True)
        - 2.0 * tf.matmul(e, everyone, transpose_b=True)
        + tf.reduce_sum(tf.square(everyone), -1)[None, :]
    )
    distances = tf.sqrt(tf.maximum(squared, 0.0) + _EPSILON)
    same = tf.equal(y[:, None], classes[None, :])
    own = tf.one_hot(
        start + tf.range(tf.shape(e)[0]),
        tf.shape(everyone)[0],
        on_value=True,
        off_value=False,
        dtype=tf.bool,
    )
    return distances, tf.logical_and(same, tf.logical_not(own)), tf.logical_not(same)


def hardest(distances: tf.Tensor, positives: tf.Tensor, negatives: tf.Tensor) -> tuple:
    """(farthest positive [b], nearest negative [b], whether the anchor has both [b])."""
    big = tf.reduce_max(distances) + 1.0
    d_ap = tf.reduce_max(tf.where(positives, distances, 0.0), axis=1)
    d_an = tf.reduce_min(tf.where(negatives, distances, big), axis=1)
    valid = tf.logical_and(tf.reduce_any(positives, 1), tf.reduce_any(negatives, 1))
    return d_ap, d_an, valid


def semi_hard_negatives(distances: tf.Tensor, negatives: tf.Tensor) -> tf.Tensor:
    """For every (anchor a, candidate p): the nearest negative farther from a than p is; if
    none is, the farthest negative (FaceNet's rule, as TensorFlow Addons applies it). [b, N].

    Sorting each anchor's negative distances once makes this O(b N log N), not O(b N^2).
    """
    big = tf.reduce_max(distances) + 1.0
    ordered = tf.sort(tf.where(negatives, distances, big), axis=1)  # negatives first, ascending
    count = tf.reduce_sum(tf.cast(negatives, tf.int32), axis=1, keepdims=True)
    farther = tf.searchsorted(tf.stop_gradient(ordered), tf.stop_gradient(distances), side="right")
    index = tf.where(farther < count, farther, tf.maximum(count - 1, 0))
    return tf.gather(ordered, index, batch_dims=1)


def triplet_values(embeddings: Any, labels: Any, margin: float, mining: str) -> tf.Tensor:
    """Per-anchor triplet loss ``max(d_ap - d_an + margin, 0)`` over mined triplets [b].

    ``batch_hard``: the anchor's farthest positive and nearest negative. ``semi_hard``: every
    positive with its semi-hard negative, averaged over the anchor's positives. An anchor
    without a positive or a negative in the global batch contributes 0.
    """
    distances, positives, negatives = anchor_distances(embeddings, labels)
    if mining == "batch_hard":
        d_ap, d_an, valid = hardest(distances, positives, negatives)
        return tf.where(valid, tf.nn.relu(d_ap - d_an + margin), 0.0)
    chosen = semi_hard_negatives(distances, negatives)
    per_pair = tf.where(positives, tf.nn.relu(distances - chosen + margin), 0.0)
    count = tf.reduce_sum(tf.cast(positives, tf.float32), axis=1)
    has_negative = tf.reduce_any(negatives, axis=1)
    value = tf.reduce_sum(per_pair, axis=1) / tf.maximum(count, 1.0)
    return tf.where(has_negative, value, 0.0)


def contrastive_values(embeddings: Any, labels: Any, margin: float) -> tf.Tensor:
    """Per-anchor contrastive loss on its hardest pairs: ``d_ap^2 + max(margin - d_an, 0)^2``
    (farthest positive, nearest negative; a missing one contributes 0) [b]."""
    distances, positives, negatives = anchor_distances(embeddings, labels)
    d_ap, d_an, _ = hardest(distances, positives, negatives)
    pull = tf.where(tf.reduce_any(positives, 1), tf.square(d_ap), 0.0)
    push = tf.where(tf.reduce_any(negatives, 1), tf.square(tf.nn.relu(margin - d_an)), 0.0)
    return pull + push


def nearest_is_same_class(embeddings: Any, labels: Any) -> tf.Tensor:
    """1 where a row's nearest other row of the global batch has its class (recall@1) [b].

    A tie between a same-class row and another counts as a hit, so the value does not depend
    on the order in which the replicas' rows are gathered.
    """
    distances, positives, negatives = anchor_distances(embeddings, labels)
    big = tf.reduce_max(distances) + 1.0
    nearest_positive = tf.reduce_min(tf.where(positives, distances, big), axis=1)
    nearest_negative = tf.reduce_min(tf.where(negatives, distances, big), axis=1)
    hit = tf.logical_and(tf.reduce_any(positives, 1), nearest_positive <= nearest_negative)
    return tf.cast(hit, tf.float32)
