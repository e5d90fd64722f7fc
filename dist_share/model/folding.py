"""Folding streams onto the batch axis, exactly: what a layer may do there, and the fix for BN.

A `SharedTower` *folds* the N streams that share a weight set: it stacks them on the batch axis
and calls the weight set once. That is the same function as N per-stream calls only when every
layer inside treats the examples of a batch independently. Dense, convolutions, attention,
embeddings, pooling over space or time, LayerNormalization, GroupNormalization,
UnitNormalization, RNNs and per-element Dropout all do. A few layers do not:

* ``keras.layers.BatchNormalization`` takes its statistics over the batch axis in training, so
  on a folded batch it would normalise every stream with a mixture of all streams' statistics.
  `prepare_for_folding` converts it *in place* to `FoldedBatchNormalization`, a subclass that
  runs ``BatchNormalization.call`` once per stream when folded (so the outputs, the gradients
  and the moving statistics are exactly those of N per-stream calls) and is plain
  ``BatchNormalization`` otherwise. The layer object, its variables, its statistics, its name
  and its config stay the same.
* Layers that cannot be converted are refused with a `FoldingError` naming the layer: a
  subclass of ``BatchNormalization`` (its own ``call`` may compute anything), a dropout layer
  whose ``noise_shape`` draws one mask for the whole batch, a stateful RNN, a layer or
  operation that works along axis 0 (the batch axis) or reduces over every axis, and a model
  whose input has a fixed batch size.

The tower announces the fold with `fold_streams`; layers read it with `folded_streams`.
`blocks.norm.StreamBatchNormalization` reads it too, so a layer you write can use it and stay
exact.
Code inside your own ``call`` that reduces over the batch axis cannot be seen from outside: use
``fold=False`` for such a tower.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from dist_share.errors import ConfigError

_PKG = "dist_share"
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


@keras.saving.register_keras_serializable(package=_PKG)
class FoldedBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` that keeps its batch statistics per stream when streams are folded.

    Outside a fold (`folded_streams` is 1), in inference, or when frozen it is exactly
    ``keras.layers.BatchNormalization``. Inside a fold of k streams in training it splits the
    batch into the k stream-major parts and runs ``BatchNormalization.call`` on each in stream
    order: each stream is normalised with its own mean and variance, and the moving statistics
    (and renorm state, and the synchronized cross-replica moments) receive the k updates that k
    per-stream calls would make, in the same order. It takes every argument
    ``BatchNormalization`` takes; `prepare_for_folding` converts existing layers to it in place.
    """

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        k = folded_streams()
        if k == 1 or not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        parts = ops.split(inputs, k, axis=0)
        masks = ops.split(mask, k, axis=0) if mask is not None else [None] * k
        outs = [
            super(FoldedBatchNormalization, self).call(x, training=training, mask=m)
            for x, m in zip(parts, masks, strict=True)
        ]
        return ops.concatenate(outs, axis=0)


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


def prepare_for_folding(layer: keras.layers.Layer, path: str = "model.tower.block") -> list[str]:
    """Make `layer` exact under folding: convert what can be converted, refuse the rest.

    Every ``keras.layers.BatchNormalization`` nested in `layer` (in a functional or Sequential
    model, or as an attribute of a subclassed layer) becomes a `FoldedBatchNormalization` in
    place: same object, same variables and statistics, same config. Call it after `layer` is
    built, so that sub-layers created in ``build`` are seen.

    Args:
        layer: a weight set that will be called on folded streams.
        path: the config key path to name in errors.

    Returns:
        The paths of the layers converted.

    Raises:
        FoldingError: a nested layer or operation mixes the examples of a batch and cannot be
            converted (see the module docstring for the list).
    """
    problems = []
    for layer_path, obj in walk(layer):
        reason = _refusal(obj)
        if reason:
            problems.append((layer_path, reason))
    if problems:
        raise FoldingError(path, *problems[0])
    converted = []
    for layer_path, obj in walk(layer):
        if type(obj) is keras.layers.BatchNormalization:
            obj.__class__ = FoldedBatchNormalization
            converted.append(layer_path)
    return converted
