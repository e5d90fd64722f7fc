"""The ``embedding`` block for categorical ids, and `CombineFields`, which pools its fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from dist_share.model.blocks.head import BuiltinBlock, as_list
from dist_share.model.serialization import register

COMBINERS = ("sum", "mean")


@register
class CombineFields(keras.layers.Layer):
    """Pool each field's embeddings over its length axis, then combine the fields.

    A categorical stream often has several fields (a user id, a history of item ids); each is
    looked up in its table and the results are reduced to one vector so that the tower after it
    sees a fixed width whatever the number of ids.

    Args:
        combiner: ``mean`` or ``sum``, over each field's length axis and then over fields.
        **kwargs: `keras.layers.Layer` arguments.

    Raises:
        ValueError: an unknown combiner.
    """

    def __init__(self, combiner: str = "mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if combiner not in COMBINERS:
            raise ValueError(f"unknown combiner {combiner!r}; expected one of {COMBINERS}")
        self.combiner = combiner

    def _reduce(self, x: Any, axis: int) -> Any:
        return ops.mean(x, axis=axis) if self.combiner == "mean" else ops.sum(x, axis=axis)

    def call(self, inputs: Any) -> Any:
        fields = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        pooled = [self._reduce(f, 1) if len(f.shape) == 3 else f for f in fields]
        if len(pooled) == 1:
            return pooled[0]
        return self._reduce(ops.stack(pooled, axis=1), 1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        first = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        return (first[0], first[-1])

    def get_config(self) -> dict:
        config = super().get_config()
        config["combiner"] = self.combiner
        return config


@register
class EmbeddingBlock(BuiltinBlock):
    """Embedding lookup for a categorical stream: ids ``[B]`` or ``[B, F]`` (F fields, one table).

    In a `SharedTower` with sharing ``shared`` the table itself is what is shared across
    streams; the F fields of one stream are combined with ``combiner`` (sum or mean).

    Args:
        vocab_size: rows of the table.
        embedding_dim: width of the table.
        combiner: ``mean`` or ``sum`` over the fields.
        units: widths of dense layers after the lookup.
        activation: after each dense layer.
        output_dim: width of a final linear projection (None: none).
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 32,
        combiner: str = "mean",
        units: Sequence[int] = (),
        activation: str = "relu",
        output_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vocab_size = int(vocab_size)
        self.embedding_dim = int(embedding_dim)
        self.combiner = combiner
        self.units = [int(u) for u in as_list(units)]
        self.activation = activation
        self.output_dim = int(output_dim) if output_dim else None
        self.table = keras.layers.Embedding(
            self.vocab_size, self.embedding_dim, name="table", dtype=self.dtype_policy
        )
        self.combine = CombineFields(combiner, dtype=self.dtype_policy)
        self._make_head(self.units, activation, None, self.output_dim)

    def build(self, input_shape: Any) -> None:
        self.table.build(input_shape)
        self._build_head((input_shape[0], self.embedding_dim))

    def call(
        self, inputs: Any, training: Any = None, num_streams: int = 1, stream_major: bool = True
    ) -> Any:
        x = self.combine(self.table(inputs))
        return self._call_head(x, training, num_streams, stream_major)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], self._head_units(self.embedding_dim))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            combiner=self.combiner,
            units=self.units,
            activation=self.activation,
            output_dim=self.output_dim,
        )
        return config
