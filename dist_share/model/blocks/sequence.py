"""The ``gru`` and ``transformer`` blocks: a sequence ``[B, T, F]`` encoded to one vector."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from dist_share.model.blocks.head import BuiltinBlock
from dist_share.model.serialization import register


@register
class SequenceBlock(BuiltinBlock):
    """A sequence ``[B, T, F]`` encoded to one vector: a GRU, or one small transformer layer.

    Args:
        kind: ``gru`` (the last state) or ``transformer`` (one encoder layer, mean-pooled).
        units: width of the GRU state or of the transformer.
        num_heads: attention heads (transformer only).
        output_dim: width of a final linear projection (None: none).
        **kwargs: `keras.layers.Layer` arguments.

    Raises:
        ValueError: an unknown kind.
    """

    def __init__(
        self,
        kind: str = "gru",
        units: int = 32,
        num_heads: int = 2,
        output_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kind not in ("gru", "transformer"):
            raise ValueError(f"unknown sequence kind {kind!r}")
        self.kind = kind
        self.units = int(units)
        self.num_heads = int(num_heads)
        self.output_dim = int(output_dim) if output_dim else None
        if kind == "gru":
            self.gru = keras.layers.GRU(self.units, name="gru", dtype=self.dtype_policy)
        else:
            self.inp = keras.layers.Dense(
                self.units, name="input_projection", dtype=self.dtype_policy
            )
            self.attn = keras.layers.MultiHeadAttention(
                self.num_heads,
                max(1, self.units // self.num_heads),
                name="attention",
                dtype=self.dtype_policy,
            )
            self.norm1 = keras.layers.LayerNormalization(name="norm1", dtype=self.dtype_policy)
            self.ffn = keras.layers.Dense(
                self.units, activation="relu", name="ffn", dtype=self.dtype_policy
            )
            self.norm2 = keras.layers.LayerNormalization(name="norm2", dtype=self.dtype_policy)
        self._make_head([], "", None, self.output_dim)

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape)
        if self.kind == "gru":
            self.gru.build(shape)
        else:
            self.inp.build(shape)
            h = (shape[0], shape[1], self.units)
            self.attn.build(h, h)
            self.norm1.build(h)
            self.ffn.build(h)
            self.norm2.build(h)
        self._build_head((shape[0], self.units))

    def call(
        self, inputs: Any, training: Any = None, num_streams: int = 1, stream_major: bool = True
    ) -> Any:
        if self.kind == "gru":
            x = self.gru(inputs, training=training)
        else:
            h = self.inp(inputs)
            h = self.norm1(h + self.attn(h, h, training=training))
            h = self.norm2(h + self.ffn(h))
            x = ops.mean(h, axis=1)
        return self._call_head(x, training, num_streams, stream_major)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], self._head_units(self.units))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            kind=self.kind,
            units=self.units,
            num_heads=self.num_heads,
            output_dim=self.output_dim,
        )
        return config
