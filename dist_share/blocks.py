"""The per-stream computation a tower shares: small Keras 3 blocks built from plain data.

Every block accepts two extra call arguments, ``num_streams`` and ``stream_major``, that only
matter to normalisation layers: when a tower *folds* N streams onto the batch axis it tells the
block how many streams are stacked and in which order, so that batch statistics stay per stream
and folding changes nothing numerically (see docs/TOWERS.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

from dist_share.errors import ConfigError, hint

BLOCK_TYPES = ("mlp", "conv2d", "embedding", "gru", "transformer")
NORMS = (None, "none", "batch", "layer")
COMBINERS = ("sum", "mean")

_PKG = "dist_share"


def _seq(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@keras.saving.register_keras_serializable(package=_PKG)
class StreamBatchNormalization(keras.layers.Layer):
    """Batch normalisation whose statistics are computed per stream when streams are folded.

    Folding N streams onto the batch axis would otherwise mix their batch statistics, so the
    folded tower would compute something different from the same tower applied stream by
    stream. Here the batch is viewed as ``[N, B, ...]`` (``stream_major``) or ``[B, N, ...]``
    and the moments are taken per stream. The moving statistics get the update that N
    consecutive per-stream calls would have made (``m <- m*mom^N + sum_i (1-mom) mom^(N-1-i) mu_i``),
    so they match the per-stream application exactly too. One gamma/beta and one set of moving
    statistics serve every stream, as a shared layer would.
    """

    def __init__(
        self,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)

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
        num_streams: int = 1,
        stream_major: bool = True,
    ) -> Any:
        dtype = inputs.dtype
        x = ops.cast(inputs, "float32")
        channels = x.shape[-1]
        if training and self.trainable:  # frozen BN runs in inference mode, as in Keras
            k = int(num_streams)
            rest = tuple(x.shape[1:])
            if k == 1:
                xs = x
                axes = list(range(len(x.shape) - 1))
            elif stream_major:
                xs = ops.reshape(x, (k, -1) + rest)
                axes = [1] + list(range(2, len(rest) + 1))
            else:
                xs = ops.reshape(x, (-1, k) + rest)
                axes = [0] + list(range(2, len(rest) + 1))
            mean, var = ops.moments(xs, axes=axes, keepdims=True)
            y = (xs - mean) * ops.rsqrt(var + self.epsilon)
            y = ops.reshape(y, ops.shape(x))
            mean_k = ops.reshape(mean, (k, channels))
            var_k = ops.reshape(var, (k, channels))
            # Later streams weigh more, exactly as N sequential EMA updates would.
            mom = self.momentum
            w = [(1.0 - mom) * mom ** (k - 1 - i) for i in range(k)]
            w = ops.reshape(ops.convert_to_tensor(w, "float32"), (k, 1))
            decay = mom**k
            # Under mixed precision reads are autocast to float16: cast back explicitly.
            mm = ops.cast(self.moving_mean, "float32")
            mv = ops.cast(self.moving_variance, "float32")
            self.moving_mean.assign(mm * decay + ops.sum(ops.stop_gradient(mean_k) * w, axis=0))
            self.moving_variance.assign(mv * decay + ops.sum(ops.stop_gradient(var_k) * w, axis=0))
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
            momentum=self.momentum, epsilon=self.epsilon, center=self.center, scale=self.scale
        )
        return config


def _make_norm(norm: str | None, name: str, dtype: Any = None) -> keras.layers.Layer | None:
    if norm in (None, "none"):
        return None
    if norm == "batch":
        return StreamBatchNormalization(name=name, dtype=dtype)
    if norm == "layer":
        return keras.layers.LayerNormalization(name=name, dtype=dtype)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _apply_norm(layer: Any, x: Any, training: Any, num_streams: int, stream_major: bool) -> Any:
    if isinstance(layer, StreamBatchNormalization):
        return layer(x, training=training, num_streams=num_streams, stream_major=stream_major)
    return layer(x, training=training)


class _Block(keras.layers.Layer):
    """Shared plumbing: an optional dense head after the block's own body."""

    def _make_head(
        self, dense: Sequence[int], activation: str, norm: str | None, output_dim: int | None
    ) -> None:
        self.head_dense = [
            keras.layers.Dense(u, name=f"dense_{i}", dtype=self.dtype_policy)
            for i, u in enumerate(dense)
        ]
        self.head_norms = [
            n
            for n in (
                _make_norm(norm, f"dense_norm_{i}", self.dtype_policy) for i in range(len(dense))
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
                x = _apply_norm(self.head_norms[i], x, training, num_streams, stream_major)
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


@keras.saving.register_keras_serializable(package=_PKG)
class MLPBlock(_Block):
    """Dense layers (+ optional norm) on the flattened per-example input."""

    def __init__(
        self,
        units: Sequence[int] = (64,),
        activation: str = "relu",
        norm: str | None = None,
        output_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = [int(u) for u in _seq(units)]
        self.activation = activation
        self.norm = norm
        self.output_dim = int(output_dim) if output_dim else None
        self._make_head(self.units, activation, norm, self.output_dim)

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
            units=self.units, activation=self.activation, norm=self.norm, output_dim=self.output_dim
        )
        return config


@keras.saving.register_keras_serializable(package=_PKG)
class Conv2DBlock(_Block):
    """Conv (+norm) + activation + max-pool per entry of ``filters``, then flatten and dense."""

    def __init__(
        self,
        filters: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        pool_size: int | None = 2,
        norm: str | None = None,
        activation: str = "relu",
        dense: Sequence[int] = (),
        output_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = [int(f) for f in _seq(filters)]
        self.kernel_size = int(kernel_size)
        self.pool_size = int(pool_size) if pool_size else None
        self.norm = norm
        self.activation = activation
        self.dense = [int(u) for u in _seq(dense)]
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
                _make_norm(norm, f"conv_norm_{i}", self.dtype_policy)
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
        self._make_head(self.dense, activation, norm, self.output_dim)

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
                x = _apply_norm(self.conv_norms[i], x, training, num_streams, stream_major)
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
            activation=self.activation,
            dense=self.dense,
            output_dim=self.output_dim,
        )
        return config


@keras.saving.register_keras_serializable(package=_PKG)
class CombineFields(keras.layers.Layer):
    """Pool each field's embeddings over its length axis, then combine the fields.

    A categorical stream often has several fields (a user id, a history of item ids); each is
    looked up in its table and the results are reduced to one vector so that the tower after it
    sees a fixed width whatever the number of ids.
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


@keras.saving.register_keras_serializable(package=_PKG)
class EmbeddingBlock(_Block):
    """Embedding lookup for a categorical stream: ids ``[B]`` or ``[B, F]`` (F fields, one table).

    In a `SharedTower` with sharing ``shared`` the table itself is what is shared across
    streams; the F fields of one stream are combined with ``combiner`` (sum or mean).
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
        self.units = [int(u) for u in _seq(units)]
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


@keras.saving.register_keras_serializable(package=_PKG)
class SequenceBlock(_Block):
    """A sequence ``[B, T, F]`` encoded to one vector: a GRU, or one small transformer layer."""

    def __init__(
        self,
        kind: str = "gru",
        units: int = 32,
        num_heads: int = 2,
        norm: str | None = None,
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


# Keys each block type accepts in its YAML spec (besides `type`).
_BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "mlp": ("units", "activation", "norm"),
    "conv2d": ("filters", "kernel_size", "pool_size", "norm", "activation", "dense"),
    "embedding": ("vocab_size", "embedding_dim", "combiner", "units", "activation"),
    "gru": ("units",),
    "transformer": ("units", "num_heads"),
}


def validate_block_spec(spec: Any, path: str = "model.tower.block") -> dict:
    """Check a block spec (plain data) and return a copy; errors name the key path."""
    if not isinstance(spec, Mapping):
        raise ConfigError(path, f"must be a mapping with a 'type' key, got {spec!r}")
    spec = dict(spec)
    kind = spec.get("type")
    if kind not in BLOCK_TYPES:
        raise ConfigError(
            f"{path}.type", f"unknown block type {kind!r}; expected one of {BLOCK_TYPES}"
        )
    allowed = _BLOCK_KEYS[kind] + ("type",)
    for key in spec:
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}", f"unknown key for a {kind} block" + hint(key, allowed)
            )
    if spec.get("norm") not in NORMS:
        raise ConfigError(
            f"{path}.norm", f"unknown norm {spec.get('norm')!r}; expected one of {NORMS}"
        )
    if kind == "embedding":
        if not isinstance(spec.get("vocab_size"), int) or spec["vocab_size"] <= 0:
            raise ConfigError(
                f"{path}.vocab_size", "an embedding block needs a positive vocab_size"
            )
        if spec.get("combiner", "mean") not in COMBINERS:
            raise ConfigError(f"{path}.combiner", f"expected one of {COMBINERS}")
    for key in ("units", "filters", "dense"):
        for i, v in enumerate(_seq(spec.get(key))):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{path}.{key}[{i}]", f"must be a positive integer, got {v!r}")
    return spec


def build_block(
    spec: Mapping[str, Any],
    output_dim: int | None = None,
    name: str | None = None,
    path: str = "model.tower.block",
    dtype: Any = None,
) -> keras.layers.Layer:
    """Build one weight set of a block from its plain-data spec (the `block:` of a tower)."""
    spec = validate_block_spec(spec, path)
    kind = spec.pop("type")
    kw: dict[str, Any] = {"output_dim": output_dim, "name": name, "dtype": dtype}
    if kind == "mlp":
        return MLPBlock(**spec, **kw)
    if kind == "conv2d":
        return Conv2DBlock(**spec, **kw)
    if kind == "embedding":
        return EmbeddingBlock(**spec, **kw)
    units = spec.get("units", 32)
    if isinstance(units, (list, tuple)):
        units = units[0]
    return SequenceBlock(kind=kind, units=units, num_heads=spec.get("num_heads", 2), **kw)


def check_block_input(
    spec: Mapping[str, Any], shape: Sequence[int | None], dtype: str, where: str
) -> None:
    """Raise ConfigError when a stream's per-example shape/dtype cannot feed the block.

    ``where`` names the stream (and key path) so the user knows which input is wrong.
    """
    kind = spec.get("type")
    shape = tuple(shape)
    is_int = "int" in str(dtype)
    if kind == "embedding":
        if not is_int:
            raise ConfigError(where, f"an embedding block needs integer ids, got dtype {dtype}")
        if len(shape) > 1:
            raise ConfigError(
                where, f"an embedding block needs shape [] or [fields], got {list(shape)}"
            )
        return
    if is_int:
        raise ConfigError(where, f"a {kind} block needs float input, got dtype {dtype}")
    if any(d is None for d in shape):
        raise ConfigError(where, f"a {kind} block needs a fully known shape, got {list(shape)}")
    if kind == "conv2d":
        if len(shape) != 3:
            raise ConfigError(
                where, f"a conv2d block needs shape [height, width, channels], got {list(shape)}"
            )
        pool = spec.get("pool_size", 2) or 1
        h, w = shape[0], shape[1]
        for i, _ in enumerate(_seq(spec.get("filters", [16, 32]))):
            h, w = h // pool, w // pool
            if h < 1 or w < 1:
                raise ConfigError(
                    where,
                    f"shape {list(shape)} is too small for the conv2d block: pooling by {pool} "
                    f"after conv {i} leaves no pixels",
                )
    elif kind in ("gru", "transformer"):
        if len(shape) != 2:
            raise ConfigError(
                where, f"a {kind} block needs shape [time, features], got {list(shape)}"
            )
    elif kind == "mlp" and len(shape) < 1:
        raise ConfigError(where, "an mlp block needs at least one feature axis, got a scalar")
