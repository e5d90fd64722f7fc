"""Folding streams onto the batch axis exactly: announcing the fold, converting BN, refusing.

`prepare_for_folding` converts ``keras.layers.BatchNormalization`` to `FoldedBatchNormalization`
and refuses layers that mix the batch otherwise (docs/TOWERS.md, "Folding your layer exactly").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from dist_share.errors import ConfigError
from dist_share.model.cross_replica import current_group
from dist_share.model.serialization import register
from dist_share.model.stream_moments import after_updates, stream_moments

_state = threading.local()

# Keras operations (functional-graph nodes that are not layers) whose `axis=None` means "reduce
# over every axis", batch included.
_REDUCTIONS = frozenset(
    {"Mean", "Sum", "Max", "Min", "Prod", "Std", "Var", "Any", "All", "Argmax", "Argmin", "Median"}
)
# Layers whose `axis` attribute indexes the full input tensor (so 0 is the batch axis).
_AXIS_LAYERS = (
    keras.layers.Softmax,
    keras.layers.Concatenate,
    keras.layers.LayerNormalization,
    keras.layers.UnitNormalization,
    keras.layers.GroupNormalization,
)


class FoldingError(ConfigError):
    """A layer inside a tower would compute something else with streams folded onto the batch.

    Args:
        path: where the tower is configured (e.g. ``model.tower.block``).
        layer_path: the offending layer, as ``outer/inner/layer`` names.
        reason: what the layer does across the batch.
    """

    def __init__(self, path: str, layer_path: str, reason: str) -> None:
        self.layer_path = layer_path
        super().__init__(
            path,
            f"layer {layer_path!r} {reason}, so folding the streams onto the batch axis would "
            "change what it computes. Build the tower with fold=False (YAML: model.tower.fold: "
            "false) to run it once per stream, or replace the layer (dist_share.model.blocks.norm."
            "StreamBatchNormalization keeps batch statistics per stream under folding).",
        )


@contextlib.contextmanager
def fold_streams(num_streams: int) -> Iterator[None]:
    """Announce that the layers called inside see ``num_streams`` streams stacked stream-major.

    A batch of ``num_streams * B`` rows holds stream 0's B examples first, then stream 1's, and
    so on. Nested uses stack (the innermost wins). The state is per thread, which is what
    `tf.distribute.MirroredStrategy` needs: each replica traces its step in its own thread.

    Args:
        num_streams: how many streams are folded (1: not folded).
    """
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(int(num_streams))
    try:
        yield
    finally:
        stack.pop()


def folded_streams() -> int:
    """How many streams the batch being computed holds, stream-major (1 outside a fold)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else 1


@register
class FoldedBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` with batch statistics per stream and over the global batch.

    In training, inside a fold of k streams (`folded_streams`; 1 outside a fold), each stream is
    normalised with its own mean and variance, taken over the rows of every replica of the step
    for all streams in one op and one all-reduce (`stream_moments.stream_moments`), and the
    moving mean/variance get the k updates that k per-stream calls would make, in stream order.
    So neither folding nor the split of the batch across replicas or processes changes the
    result. In inference, or when frozen, it is exactly ``keras.layers.BatchNormalization``.
    With ``renorm=True`` it runs ``BatchNormalization.call`` once per stream (renorm's state
    is updated between streams), each with the global moments: exact too, one all-reduce per
    stream. Keras's own ``synchronized`` is not consulted: ``sync`` decides.

    It takes every argument ``BatchNormalization`` takes; `prepare_for_folding` and
    `convert_batch_norm` convert existing layers to it in place.

    Args:
        sync: take the moments over the global batch; False: over this replica's rows only.
        **kwargs: ``keras.layers.BatchNormalization`` arguments.
    """

    sync = True  # layers converted in place keep their __dict__: the default comes from here

    def __init__(self, sync: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sync = bool(sync)

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        k = folded_streams()
        if k == 1 and (self.renorm or not self.sync or current_group().num_replicas == 1):
            # One stream of one replica's rows: Keras's own (fused) computation is this layer's.
            return super().call(inputs, training=training, mask=mask)
        if self.renorm:
            parts = ops.split(inputs, k, axis=0)
            masks = ops.split(mask, k, axis=0) if mask is not None else [None] * k
            outs = [
                super(FoldedBatchNormalization, self).call(x, training=training, mask=m)
                for x, m in zip(parts, masks, strict=True)
            ]
            return ops.concatenate(outs, axis=0)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = tf.cast(inputs, dtype)
        axis = self.axis % len(x.shape)
        # [k * B, ...] stream-major -> [k, B, ...]; inner sizes may be unknown (a sequence).
        folded = [k, -1] + [tf.shape(x)[i] if d is None else d for i, d in enumerate(x.shape)][1:]
        xs = tf.reshape(x, folded)
        weights = None
        if mask is not None:
            weights = tf.broadcast_to(tf.cast(tf.expand_dims(mask, -1), dtype), tf.shape(x))
            weights = tf.reshape(weights, folded)
        moving_mean = tf.cast(self.moving_mean, dtype)
        mean, variance = stream_moments(xs, 0, axis + 1, moving_mean, self.sync, weights)
        self.moving_mean.assign(after_updates(moving_mean, mean, self.momentum))
        self.moving_variance.assign(
            after_updates(tf.cast(self.moving_variance, dtype), variance, self.momentum)
        )
        # What tf.nn.batch_normalization computes, with [k, C] statistics.
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * tf.cast(self.gamma, dtype)
        offset = -mean * inv if not self.center else tf.cast(self.beta, dtype) - mean * inv
        shape = [1] * len(xs.shape)
        shape[0], shape[axis + 1] = k, -1
        y = xs * tf.reshape(inv, shape) + tf.reshape(offset, shape)
        return tf.cast(tf.reshape(y, tf.shape(x)), self.compute_dtype)

    def _moments(self, inputs: Any, mask: Any) -> tuple[Any, Any]:
        """The global moments of one stream (the renorm path's ``BatchNormalization.call``)."""
        if not self.sync or current_group().num_replicas == 1:
            return super()._moments(inputs, mask)  # this replica's rows are the whole batch
        weights = None
        if mask is not None:
            weights = tf.broadcast_to(
                tf.expand_dims(tf.cast(mask, inputs.dtype), -1), tf.shape(inputs)
            )
            weights = weights[None]
        axis = self.axis % len(inputs.shape)
        mean, variance = stream_moments(
            inputs[None], 0, axis + 1, tf.cast(self.moving_mean, inputs.dtype), self.sync, weights
        )
        return mean[0], variance[0]

    def get_config(self) -> dict:
        config = super().get_config()
        # Only when off: a converted layer's config stays the one its author wrote.
        if not self.sync:
            config["sync"] = False
        return config


def _children(layer: Any) -> list:
    """Direct sub-layers (and, for a functional model, the graph's non-layer operations)."""
    children = list(getattr(layer, "_layers", None) or [])
    if isinstance(layer, keras.Model):
        for op in getattr(layer, "operations", None) or []:
            if not isinstance(op, keras.layers.Layer) and op not in children:
                children.append(op)
    return children


def walk(layer: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, layer_or_op)`` for `layer` and everything nested in it, depth first."""
    seen: set[int] = set()

    def visit(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        yield path, obj
        for child in _children(obj):
            yield from visit(child, f"{path}/{getattr(child, 'name', type(child).__name__)}")

    yield from visit(layer, prefix or getattr(layer, "name", type(layer).__name__))


def _axes(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _refusal(obj: Any) -> str | None:
    """Why `obj` cannot be folded as it is (None: it can, possibly after conversion)."""
    kind = type(obj).__name__
    if isinstance(obj, keras.layers.BatchNormalization):
        if type(obj) in (keras.layers.BatchNormalization, FoldedBatchNormalization):
            return None
        return (
            f"({kind}) subclasses BatchNormalization with its own code; only "
            "keras.layers.BatchNormalization itself is converted to per-stream statistics"
        )
    noise_shape = getattr(obj, "noise_shape", None)
    if isinstance(noise_shape, (list, tuple)) and noise_shape and noise_shape[0] == 1:
        return (
            f"({kind}) draws one dropout mask for the whole batch (noise_shape={noise_shape}), "
            "which would share it across the streams"
        )
    if getattr(obj, "stateful", False) is True:
        return f"({kind}) is stateful: its state is kept per batch row"
    if isinstance(obj, keras.Model):
        for tensor in getattr(obj, "inputs", None) or []:
            if tensor.shape and tensor.shape[0] is not None:
                return f"has a fixed batch size {tensor.shape[0]} in its input"
    if isinstance(obj, _AXIS_LAYERS) or not isinstance(obj, keras.layers.Layer):
        axis = getattr(obj, "axis", "absent")
        if axis is None and kind in _REDUCTIONS:
            return f"({kind}) reduces over every axis, the batch axis included"
        if axis != "absent" and 0 in _axes(axis):
            return f"({kind}) works along axis 0, the batch axis"
    return None


def convert_batch_norm(layer: keras.layers.Layer) -> list[str]:
    """Convert every ``keras.layers.BatchNormalization`` nested in `layer` in place.

    Each becomes a `FoldedBatchNormalization`: same object, same variables and statistics, same
    name and config, with statistics per stream and over the global batch. Subclasses of
    ``BatchNormalization`` are left as they are (their own ``call`` may compute anything).

    Returns:
        The paths of the layers converted.
    """
    converted = []
    for layer_path, obj in walk(layer):
        if type(obj) is keras.layers.BatchNormalization:
            obj.__class__ = FoldedBatchNormalization
            converted.append(layer_path)
    return converted


def prepare_for_folding(layer: keras.layers.Layer, path: str = "model.tower.block") -> list[str]:
    """Make `layer` exact under folding: convert what can be converted, refuse the rest.

    Every ``keras.layers.BatchNormalization`` nested in `layer` (in a functional or Sequential
    model, or as an attribute of a subclassed layer) becomes a `FoldedBatchNormalization` in
    place (`convert_batch_norm`). Call it after `layer` is built, so that sub-layers created in
    ``build`` are seen.

    Args:
        layer: a weight set that will be called on folded streams.
        path: the config key path to name in errors.

    Returns:
        The paths of the layers converted.

    Raises:
        FoldingError: a nested layer or operation mixes the examples of a batch and cannot be
            converted (docs/TOWERS.md has the list).
    """
    problems = []
    for layer_path, obj in walk(layer):
        reason = _refusal(obj)
        if reason:
            problems.append((layer_path, reason))
    if problems:
        raise FoldingError(path, *problems[0])
    return convert_batch_norm(layer)
