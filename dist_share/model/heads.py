"""Combine the per-stream outputs of a tower: concat / sum / mean, distances, similarities, dot.

Distance and similarity heads compute in float32 whatever the global dtype policy: under
mixed_float16 a squared distance of 64-d embeddings easily loses all precision (or overflows),
and the losses built on them must see float32.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from dist_share.errors import ConfigError
from dist_share.model.serialization import register

COMBINE_MODES = ("concat", "sum", "mean")


def _as_list(inputs: Any) -> list:
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    # A stacked [B, N, D] tensor: one entry per stream.
    return [inputs[:, i] for i in range(inputs.shape[1])]


@register
class Combine(keras.layers.Layer):
    """Concat / sum / mean of N stream outputs ``[B, D]`` (or a stacked ``[B, N, D]``).

    Args:
        mode: ``concat`` (output ``[B, N*D]``), ``sum`` or ``mean`` (output ``[B, D]``).
        **kwargs: `keras.layers.Layer` arguments.

    Raises:
        ConfigError: an unknown mode (path ``model.head``).
    """

    def __init__(self, mode: str = "concat", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in COMBINE_MODES:
            raise ConfigError(
                "model.head", f"unknown combine mode {mode!r}; expected one of {COMBINE_MODES}"
            )
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        if not isinstance(inputs, (list, tuple)):
            if self.mode == "concat":
                return ops.reshape(inputs, (-1, inputs.shape[1] * inputs.shape[2]))
            return ops.sum(inputs, axis=1) if self.mode == "sum" else ops.mean(inputs, axis=1)
        if self.mode == "concat":
            return ops.concatenate(list(inputs), axis=-1)
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total if self.mode == "sum" else total / len(inputs)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if isinstance(input_shape[0], (list, tuple)):
            b, d = input_shape[0][0], input_shape[0][-1]
            n = len(input_shape)
        else:
            b, n, d = input_shape[0], input_shape[1], input_shape[2]
        return (b, n * d if self.mode == "concat" else d)

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


class _PairHead(keras.layers.Layer):
    """Base of the heads that compare streams: float32 by default, whatever the global policy."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def _pair(self, inputs: Any) -> tuple:
        xs = _as_list(inputs)
        if len(xs) != 2:
            raise ValueError(f"{self.name} needs exactly 2 streams, got {len(xs)}")
        return ops.cast(xs[0], "float32"), ops.cast(xs[1], "float32")

    def compute_output_shape(self, input_shape: Any) -> tuple:
        first = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        return (first[0],)


@register
class L2Distance(_PairHead):
    """Euclidean distance ``[B]`` of two stream outputs, in float32.

    Args:
        epsilon: added under the square root, so the gradient stays finite at distance 0.
        **kwargs: `keras.layers.Layer` arguments (dtype defaults to float32).

    Raises:
        ValueError: when called on other than 2 streams.
    """

    def __init__(self, epsilon: float = 1e-9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        a, b = self._pair(inputs)
        return ops.sqrt(ops.sum(ops.square(a - b), axis=-1) + self.epsilon)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@register
class CosineSimilarity(_PairHead):
    """Cosine similarity ``[B]`` of two stream outputs, in float32.

    Args:
        as_distance: return ``1 - cos`` instead, for distance losses.
        epsilon: lower bound of the squared norms (zero vectors give 0, not NaN).
        **kwargs: `keras.layers.Layer` arguments (dtype defaults to float32).

    Raises:
        ValueError: when called on other than 2 streams.
    """

    def __init__(self, as_distance: bool = False, epsilon: float = 1e-12, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.as_distance = bool(as_distance)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        a, b = self._pair(inputs)
        a = a * ops.rsqrt(ops.maximum(ops.sum(ops.square(a), -1, keepdims=True), self.epsilon))
        b = b * ops.rsqrt(ops.maximum(ops.sum(ops.square(b), -1, keepdims=True), self.epsilon))
        cos = ops.sum(a * b, axis=-1)
        return 1.0 - cos if self.as_distance else cos

    def get_config(self) -> dict:
        return {**super().get_config(), "as_distance": self.as_distance, "epsilon": self.epsilon}


@register
class DotProduct(_PairHead):
    """Dot product score ``[B]`` of a query and a candidate embedding (two-tower logits).

    Raises:
        ValueError: when called on other than 2 streams.
    """

    def call(self, inputs: Any) -> Any:
        a, b = self._pair(inputs)
        return ops.sum(a * b, axis=-1)


@register
class TripletDistances(_PairHead):
    """``[B, 2]`` = (d(anchor, positive), d(anchor, negative)), Euclidean, float32.

    Args:
        epsilon: added under the square roots (finite gradient at distance 0).
        **kwargs: `keras.layers.Layer` arguments (dtype defaults to float32).

    Raises:
        ValueError: when called on other than 3 streams.
    """

    def __init__(self, epsilon: float = 1e-9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        xs = [ops.cast(x, "float32") for x in _as_list(inputs)]
        if len(xs) != 3:
            raise ValueError(
                f"{self.name} needs 3 streams (anchor, positive, negative), got {len(xs)}"
            )
        a, p, n = xs
        d_ap = ops.sqrt(ops.sum(ops.square(a - p), axis=-1) + self.epsilon)
        d_an = ops.sqrt(ops.sum(ops.square(a - n), axis=-1) + self.epsilon)
        return ops.stack([d_ap, d_an], axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        first = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        return (first[0], 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


@register
class StackPair(_PairHead):
    """``[B, 2, D]`` float32 (query, candidate), so losses can use in-batch negatives.

    Raises:
        ValueError: when called on other than 2 streams.
    """

    def call(self, inputs: Any) -> Any:
        a, b = self._pair(inputs)
        return ops.stack([a, b], axis=1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], 2, input_shape[0][-1])


@register
class DecisionThreshold(keras.layers.Layer):
    """The distance below which a pair is "same", kept with the model: a non-trainable weight
    (saved in checkpoints and exports) that evaluation sets to the calibrated threshold
    (``model.head_threshold: calibrated``). The layer passes its input through."""

    def __init__(self, initial: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial = float(initial)
        self.threshold = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial),
            trainable=False,
            dtype="float32",
            name="threshold",
        )

    def call(self, inputs: Any) -> Any:
        return inputs

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "initial": self.initial}
