"""The ``conv2d`` block: conv (+norm) + activation + max-pool per filter count, then dense."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from dist_share.model.blocks.head import BuiltinBlock, as_list
from dist_share.model.blocks.norm import apply_norm, make_norm
from dist_share.model.serialization import register


@register
class Conv2DBlock(BuiltinBlock):
    """Conv (+norm) + activation + max-pool per entry of ``filters``, then flatten and dense.

    Args:
        filters: channels of each ``same``-padded convolution.
        kernel_size: square kernel size of every convolution.
        pool_size: max-pool after each convolution (None: no pooling).
        norm: ``None``, ``"batch"`` (`StreamBatchNormalization`) or ``"layer"``.
        norm_sync: batch statistics over the global batch (every replica's rows); False: per
            replica. Only ``norm="batch"`` has any.
        activation: after each convolution (and its norm) and each dense layer.
        dense: widths of dense layers after flattening.
        output_dim: width of a final linear projection (None: none).
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        filters: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        pool_size: int | None = 2,
        norm: str | None = None,
        activation: str = "relu",
        dense: Sequence[int] = (),
        output_dim: int | None = None,
        norm_sync: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = [int(f) for f in as_list(filters)]
        self.kernel_size = int(kernel_size)
        self.pool_size = int(pool_size) if pool_size else None
        self.norm = norm
        self.norm_sync = bool(norm_sync)
        self.activation = activation
        self.dense = [int(u) for u in as_list(dense)]
        self.output_dim = int(output_dim) if output_dim else None
        self.convs = [
            keras.layers.Conv2D(
                f, self.kernel_size, padding="same", name=f"conv_{i}", dtype=self.dtype_policy
            )
            for i, f in enumerate(self.filters)
        ]
        self.conv_norms = [
            n
            for n in (
                make_norm(norm, f"conv_norm_{i}", self.dtype_policy, self.norm_sync)
                for i in range(len(self.filters))
            )
            if n
        ]
        self.pool = (
            keras.layers.MaxPooling2D(self.pool_size, dtype=self.dtype_policy)
            if self.pool_size
            else None
        )
        self.act = keras.layers.Activation(activation, dtype=self.dtype_policy)
        self._make_head(self.dense, activation, norm, self.output_dim, self.norm_sync)

    def _conv_shape(self, shape: tuple) -> tuple:
        b, h, w, _ = shape
        for f in self.filters:
            if self.pool_size:
                h, w = h // self.pool_size, w // self.pool_size
            shape = (b, h, w, f)
        return shape

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape)
        for i, conv in enumerate(self.convs):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            if self.conv_norms:
                self.conv_norms[i].build(shape)
            if self.pool is not None:
                shape = self.pool.compute_output_shape(shape)
        self._build_head((shape[0], math.prod(int(d) for d in shape[1:])))

    def call(
        self, inputs: Any, training: Any = None, num_streams: int = 1, stream_major: bool = True
    ) -> Any:
        x = inputs
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.conv_norms:
                x = apply_norm(self.conv_norms[i], x, training, num_streams, stream_major)
            x = self.act(x)
            if self.pool is not None:
                x = self.pool(x)
        x = ops.reshape(x, (-1, math.prod(int(d) for d in x.shape[1:])))
        return self._call_head(x, training, num_streams, stream_major)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = self._conv_shape(tuple(input_shape))
        return (input_shape[0], self._head_units(math.prod(int(d) for d in shape[1:])))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            pool_size=self.pool_size,
            norm=self.norm,
            norm_sync=self.norm_sync,
            activation=self.activation,
            dense=self.dense,
            output_dim=self.output_dim,
        )
        return config
