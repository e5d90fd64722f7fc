"""A replica's gradients from k micro-batches (``training.grad_accum_steps``).

Per-example losses add up micro-batch by micro-batch. A loss that couples rows (in-batch
negatives) runs GradCache: forward every micro-batch without a tape, the loss over all of their
outputs, then each micro-batch's forward again under a tape, backpropagating its slice of
d loss / d outputs. Why and what it refuses: docs/DISTRIBUTED.md, "Micro-batches".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from dist_share.errors import ConfigError
from dist_share.model.blocks.norm import StreamBatchNormalization
from dist_share.model.sampling import same_step
from dist_share.train.evaluation import score

if TYPE_CHECKING:
    from dist_share.families.build import ModelSpec

# (features, labels) of one micro-batch.
MicroBatch = tuple[Any, tf.Tensor]
# The loss a tape differentiates, from the per-example values of the rows it covers.
LossOf = Callable[[tf.Tensor], tf.Tensor]


def split(features: Any, labels: tf.Tensor, k: int) -> list[MicroBatch]:
    """The replica's batch as k equal micro-batches, in row order."""
    if k == 1:
        return [(features, labels)]
    parts = [tf.split(t, k, axis=0) for t in tf.nest.flatten(features)]
    ys = tf.split(labels, k, axis=0)
    return [(tf.nest.pack_sequence_as(features, [p[i] for p in parts]), ys[i]) for i in range(k)]


def couples_rows(fn: Any) -> bool:
    """Whether a loss's value for a row depends on other rows of the batch."""
    return bool(getattr(fn, "couples_rows", False))


def check_replayable(model: keras.Model) -> None:
    """GradCache runs each micro-batch's training forward twice and needs both to agree.

    Raises:
        ConfigError: at ``training.grad_accum_steps``, naming the first layer whose training
            forward is batch-coupled (batch normalisation: a micro-batch's statistics are not
            the batch's) or random (dropout, noise: the two forwards would draw differently).
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        batch_norm = isinstance(layer, (keras.layers.BatchNormalization, StreamBatchNormalization))
        if batch_norm and layer.trainable:
            why = (
                "normalises with batch statistics, which a micro-batch cannot give for the "
                "whole batch"
            )
        elif layer._seed_generators:
            why = "draws random numbers in training, differently in each of the two forwards"
        else:
            continue
        raise ConfigError(
            "training.grad_accum_steps",
            f"> 1 with a loss that compares rows of the batch (in-batch negatives) runs each "
            f"micro-batch's forward twice (GradCache), and layer {layer.name!r} "
            f"({type(layer).__name__}) {why}; use grad_accum_steps: 1 (a bigger replica batch "
            "or more replicas), or a model without it",
        )


def _within_step(index: int) -> Any:
    """The first micro-batch's forward starts the step; the others continue it (layers that
    count training steps, such as `sampling.CandidateFrequency`, count the step once)."""
    return same_step() if index else contextlib.nullcontext()


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.concat([a.values, b.values], 0), tf.concat([a.indices, b.indices], 0), a.dense_shape
        )
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def tensors_of(grads: list[Any]) -> list[tf.Tensor]:
    """The tensors of a gradient list (a sparse one's values and indices), for control deps."""
    out = []
    for g in grads:
        if isinstance(g, tf.IndexedSlices):
            out.extend([g.values, g.indices])
        elif g is not None:
            out.append(g)
    return out


def _concat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    return tf.nest.map_structure(lambda *xs: tf.concat(xs, 0), *parts)


def per_example(
    spec: ModelSpec, micro: list[MicroBatch], tvars: list[Any], loss_of: LossOf
) -> tuple[list[Any], dict[str, tf.Tensor]]:
    """(summed gradients, logged sums) for a loss that adds up over rows.

    Micro-batch i+1 starts after i's gradients exist, so one micro-batch's activations are live
    at a time. The metrics are computed once, on every micro-batch's outputs together, so a
    metric that compares rows sees the replica's whole batch.
    """
    grads: list[Any] = [None] * len(tvars)
    outputs, values = [], []
    for i, (features, labels) in enumerate(micro):
        with (
            tf.control_dependencies(tensors_of(grads)),
            tf.GradientTape() as tape,
            _within_step(i),
        ):
            preds = spec.model(features, training=True)
            rows = tf.cast(spec.loss(labels, preds), tf.float32)
            loss = loss_of(rows)
        grads = [_add(a, b) for a, b in zip(grads, tape.gradient(loss, tvars), strict=True)]
        outputs.append(tf.nest.map_structure(tf.stop_gradient, preds))
        values.append(tf.stop_gradient(rows))
    labels = _concat([y for _, y in micro])
    return grads, score(spec, labels, _concat(outputs), _concat(values))[1]


def grad_cache(
    spec: ModelSpec, micro: list[MicroBatch], tvars: list[Any], loss_of: LossOf
) -> tuple[list[Any], dict[str, tf.Tensor]]:
    """(summed gradients, logged sums) for a loss over the replica's whole batch (GradCache).

    The gradients are those of one forward over the whole batch, while only one micro-batch's
    activations are live at a time; the model's training forward must be deterministic and
    free of batch statistics (`check_replayable`).
    """
    outputs: list[Any] = []
    for i, (features, _) in enumerate(micro):
        # No tape: nothing is kept. One forward after another, not side by side.
        after = tf.nest.flatten(outputs[-1]) if outputs else []
        with tf.control_dependencies(after), _within_step(i):
            outputs.append(spec.model(features, training=True))
    preds = _concat(outputs)
    flat = tf.nest.flatten(preds)
    labels = _concat([y for _, y in micro])
    with tf.GradientTape() as tape:
        tape.watch(flat)
        rows = tf.cast(spec.loss(labels, preds), tf.float32)
        loss = loss_of(rows)
    sums = score(spec, labels, preds, rows)[1]
    d_flat = [
        tf.zeros_like(p) if g is None else g
        for p, g in zip(flat, tape.gradient(loss, flat), strict=True)
    ]
    sizes = [tf.shape(tf.nest.flatten(out)[0])[0] for out in outputs]
    slices = [tf.split(g, sizes, axis=0) for g in d_flat]
    grads: list[Any] = [None] * len(tvars)
    for i, (features, _) in enumerate(micro):
        with (
            tf.control_dependencies(tensors_of(grads) + d_flat),
            tf.GradientTape() as tape,
            same_step(),
        ):
            out = tf.nest.flatten(spec.model(features, training=True))
        step = tape.gradient(out, tvars, output_gradients=[s[i] for s in slices])
        grads = [_add(a, b) for a, b in zip(grads, step, strict=True)]
    return grads, sums


def gradients(
    spec: ModelSpec, features: Any, labels: tf.Tensor, k: int, tvars: list[Any], loss_of: LossOf
) -> tuple[list[Any], dict[str, tf.Tensor]]:
    """(gradients summed over the replica's batch, logged sums) from k micro-batches."""
    micro = split(features, labels, k)
    if k > 1 and couples_rows(spec.loss):
        return grad_cache(spec, micro, tvars, loss_of)
    return per_example(spec, micro, tvars, loss_of)
