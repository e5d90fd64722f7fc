"""The ``mlp`` block: dense layers (+ optional norm) on the flattened per-example input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import ops

from dist_share.model.blocks.head import BuiltinBlock, as_list
from dist_share.model.serialization import register


@register
class MLPBlock(BuiltinBlock):
    """Dense layers (+ optional norm) on the flattened per-example input.

    Args:
        units: width of each dense layer.
        activation: after each dense layer (and its norm).
        norm: ``None``, ``"batch"`` (`StreamBatchNormalization`) or ``"layer"``.
        norm_sync: batch statistics over the global batch (every replica's rows); False: per
            replica. Only ``norm="batch"`` has any.
        output_dim: width of a final linear projection (None: none).
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        units: Sequence[int] = (64,),
        activation: str = "relu",
        norm: str | None = None,
        output_dim: int | None = None,
        norm_sync: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = [int(u) for u in as_list(units)]
        self.activation = activation
        self.norm = norm
        self.norm_sync = bool(norm_sync)
        self.output_dim = int(output_dim) if output_dim else None
        self._make_head(self.units, activation, norm, self.output_dim, self.norm_sync)

    def build(self, input_shape: Any) -> None:
        flat = math.prod(int(d) for d in input_shape[1:])
        self._build_head((input_shape[0], flat))

    def call(
        self, inputs: Any, training: Any = None, num_streams: int = 1, stream_major: bool = True
    ) -> Any:
        x = inputs
        if len(x.shape) != 2:
            x = ops.reshape(x, (-1, math.prod(int(d) for d in x.shape[1:])))
        return self._call_head(x, training, num_streams, stream_major)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        flat = math.prod(int(d) for d in input_shape[1:])
        return (input_shape[0], self._head_units(flat))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            units=self.units,
            activation=self.activation,
            norm=self.norm,
            norm_sync=self.norm_sync,
            output_dim=self.output_dim,
        )
        return config
