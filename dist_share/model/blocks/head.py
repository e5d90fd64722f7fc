"""The base of the built-in blocks: the dense layers (+ norm) and projection each ends with.

Every built-in block accepts two extra call arguments, ``num_streams`` and ``stream_major``,
that only matter to normalisation layers: a tower that folds N streams onto the batch axis
tells the block how many are stacked and in which order (see `norm.StreamBatchNormalization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from dist_share.model.blocks.norm import apply_norm, make_norm


def as_list(value: Any) -> list:
    """A YAML value that may be one item or several, as a list (None: empty)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class BuiltinBlock(keras.layers.Layer):
    """Shared plumbing: an optional dense head after the block's own body."""

    def _make_head(
        self,
        dense: Sequence[int],
        activation: str,
        norm: str | None,
        output_dim: int | None,
        norm_sync: bool = True,
    ) -> None:
        self.head_dense = [
            keras.layers.Dense(u, name=f"dense_{i}", dtype=self.dtype_policy)
            for i, u in enumerate(dense)
        ]
        self.head_norms = [
            n
            for n in (
                make_norm(norm, f"dense_norm_{i}", self.dtype_policy, norm_sync)
                for i in range(len(dense))
            )
            if n
        ]
        self.head_act = (
            keras.layers.Activation(activation, dtype=self.dtype_policy) if activation else None
        )
        self.projection = (
            keras.layers.Dense(output_dim, name="projection", dtype=self.dtype_policy)
            if output_dim
            else None
        )

    def _build_head(self, shape: tuple) -> tuple:
        for i, layer in enumerate(self.head_dense):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
            if self.head_norms:
                self.head_norms[i].build(shape)
        if self.projection is not None:
            self.projection.build(shape)
            shape = self.projection.compute_output_shape(shape)
        return shape

    def _call_head(self, x: Any, training: Any, num_streams: int, stream_major: bool) -> Any:
        for i, layer in enumerate(self.head_dense):
            x = layer(x)
            if self.head_norms:
                x = apply_norm(self.head_norms[i], x, training, num_streams, stream_major)
            if self.head_act is not None:
                x = self.head_act(x)
        if self.projection is not None:
            x = self.projection(x)
        return x

    def _head_units(self, default: int) -> int:
        if self.projection is not None:
            return self.projection.units
        if self.head_dense:
            return self.head_dense[-1].units
        return default


def is_builtin_block(layer: Any) -> bool:
    """True for the blocks built from plain data here (they take ``num_streams`` in ``call``)."""
    return isinstance(layer, BuiltinBlock)
