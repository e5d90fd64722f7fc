"""Normalisation inside blocks: `StreamBatchNormalization` and the ``norm:`` choice.

Batch statistics are per stream and over the global batch, so neither folding N streams onto
the batch axis nor splitting the batch across replicas changes them (see docs/TOWERS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from dist_share.model.folding import folded_streams
from dist_share.model.serialization import register
from dist_share.model.stream_moments import after_updates, stream_moments

NORMS = (None, "none", "batch", "layer")


@register
class StreamBatchNormalization(keras.layers.Layer):
    """Batch normalisation whose statistics are per stream and over the global batch.

    Folding N streams onto the batch axis would otherwise mix their batch statistics, so the
    folded tower would compute something different from the same tower applied stream by
    stream. Here the batch is viewed as ``[N, B, ...]`` (``stream_major``) or ``[B, N, ...]``
    and the moments are taken per stream, for all streams in one op, over the rows of every
    replica of the step (`stream_moments.stream_moments`: one all-reduce per call). The moving
    statistics get the update that N consecutive per-stream calls would have made
    (``m <- m*mom^N + sum_i (1-mom) mom^(N-1-i) mu_i``), so they match the per-stream
    application exactly too. One gamma/beta and one set of moving statistics serve every
    stream, as a shared layer would.

    Built-in blocks pass ``num_streams``/``stream_major`` explicitly; in a layer of your own,
    leave them out and the layer reads the tower's fold (`folding.folded_streams`, stream-major).

    Args:
        momentum: moving-average momentum of the statistics.
        epsilon: added to the variance.
        center: learn a ``beta`` offset.
        scale: learn a ``gamma`` scale.
        sync: take the moments over the global batch (every replica's rows); False: over this
            replica's rows only. With one replica both are the same.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        sync: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.sync = bool(sync)

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel axis (last) must be known, got {input_shape}"
            )
        shape = (channels,)
        self.gamma = (
            self.add_weight(shape=shape, initializer="ones", name="gamma") if self.scale else None
        )
        self.beta = (
            self.add_weight(shape=shape, initializer="zeros", name="beta") if self.center else None
        )
        self.moving_mean = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="moving_mean"
        )
        self.moving_variance = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="moving_variance"
        )

    def call(
        self,
        inputs: Any,
        training: bool | None = None,
        num_streams: int | None = None,
        stream_major: bool = True,
    ) -> Any:
        if num_streams is None:
            num_streams = folded_streams()
        dtype = inputs.dtype
        x = ops.cast(inputs, "float32")
        channels = x.shape[-1]
        if training and self.trainable:  # frozen BN runs in inference mode, as in Keras
            k = int(num_streams)
            rest = tuple(ops.shape(x)[1:])
            xs = ops.reshape(x, ((k, -1) if stream_major else (-1, k)) + rest)
            stream_axis = 0 if stream_major else 1
            # Under mixed precision reads are autocast to float16: cast back explicitly.
            mm = ops.cast(self.moving_mean, "float32")
            mv = ops.cast(self.moving_variance, "float32")
            mean_k, var_k = stream_moments(xs, stream_axis, len(rest) + 1, mm, sync=self.sync)
            shape = [1] * len(xs.shape)
            shape[stream_axis], shape[-1] = k, channels
            inv = ops.rsqrt(ops.reshape(var_k, shape) + self.epsilon)
            y = (xs - ops.reshape(mean_k, shape)) * inv
            y = ops.reshape(y, ops.shape(x))
            # Later streams weigh more, exactly as N sequential EMA updates would.
            self.moving_mean.assign(after_updates(mm, mean_k, self.momentum))
            self.moving_variance.assign(after_updates(mv, var_k, self.momentum))
        else:
            mm = ops.cast(self.moving_mean, "float32")
            mv = ops.cast(self.moving_variance, "float32")
            y = (x - mm) * ops.rsqrt(mv + self.epsilon)
        if self.gamma is not None:
            y = y * ops.cast(self.gamma, "float32")
        if self.beta is not None:
            y = y + ops.cast(self.beta, "float32")
        return ops.cast(y, dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            sync=self.sync,
        )
        return config


def make_norm(
    norm: str | None, name: str, dtype: Any = None, sync: bool = True
) -> keras.layers.Layer | None:
    """The normalisation layer that ``norm`` names (None for ``None``/``"none"``); `sync` is
    `StreamBatchNormalization`'s (the block key ``norm_sync``)."""
    if norm in (None, "none"):
        return None
    if norm == "batch":
        return StreamBatchNormalization(name=name, dtype=dtype, sync=sync)
    if norm == "layer":
        return keras.layers.LayerNormalization(name=name, dtype=dtype)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def apply_norm(layer: Any, x: Any, training: Any, num_streams: int, stream_major: bool) -> Any:
    """Call a norm layer, telling a `StreamBatchNormalization` how the streams are folded."""
    if isinstance(layer, StreamBatchNormalization):
        return layer(x, training=training, num_streams=num_streams, stream_major=stream_major)
    return layer(x, training=training)
