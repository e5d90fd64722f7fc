"""The per-stream computation a tower shares, described as plain data (the YAML ``block:``).

Five built-in blocks (``mlp``, ``conv2d``, ``embedding``, ``gru``, ``transformer``) and two that
bring a Keras model of your own: ``custom`` (a factory named ``"package.module:function"``,
called with ``args``) and ``keras_application`` (``keras.applications.<name>`` with
``weights=None`` by default). `validate_block_spec` checks a spec once and returns a frozen
`BlockSpec`; `build_block` builds one weight set from it.

Every built-in block accepts two extra call arguments, ``num_streams`` and ``stream_major``,
that only matter to normalisation layers: when a tower *folds* N streams onto the batch axis it
tells the block how many streams are stacked and in which order, so that batch statistics stay
per stream and folding changes nothing numerically (see docs/TOWERS.md).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
from keras import ops

from dist_share.errors import ConfigError, hint
from dist_share.model.folding import folded_streams

BUILTIN_BLOCK_TYPES = ("mlp", "conv2d", "embedding", "gru", "transformer")
USER_BLOCK_TYPES = ("custom", "keras_application")
BLOCK_TYPES = BUILTIN_BLOCK_TYPES + USER_BLOCK_TYPES
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

    Built-in blocks pass ``num_streams``/``stream_major`` explicitly; in a layer of your own,
    leave them out and the layer reads the tower's fold (`folding.folded_streams`, stream-major).

    Args:
        momentum: moving-average momentum of the statistics.
        epsilon: added to the variance.
        center: learn a ``beta`` offset.
        scale: learn a ``gamma`` scale.
        **kwargs: `keras.layers.Layer` arguments.
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
    """Dense layers (+ optional norm) on the flattened per-example input.

    Args:
        units: width of each dense layer.
        activation: after each dense layer (and its norm).
        norm: ``None``, ``"batch"`` (`StreamBatchNormalization`) or ``"layer"``.
        output_dim: width of a final linear projection (None: none).
        **kwargs: `keras.layers.Layer` arguments.
    """

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
    """Conv (+norm) + activation + max-pool per entry of ``filters``, then flatten and dense.

    Args:
        filters: channels of each ``same``-padded convolution.
        kernel_size: square kernel size of every convolution.
        pool_size: max-pool after each convolution (None: no pooling).
        norm: ``None``, ``"batch"`` (`StreamBatchNormalization`) or ``"layer"``.
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


@keras.saving.register_keras_serializable(package=_PKG)
class EmbeddingBlock(_Block):
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


def is_builtin_block(layer: Any) -> bool:
    """True for the blocks built from plain data here (they take ``num_streams`` in ``call``)."""
    return isinstance(layer, _Block)


@keras.saving.register_keras_serializable(package=_PKG)
class KerasApplicationBlock(keras.layers.Layer):
    """A ``keras.applications`` model as a tower block, created when the input shape is known.

    The application is built in ``build`` with ``input_shape`` set to the stream's per-example
    shape (resized first to ``input_size`` when given: the applications need at least 32x32),
    ``include_top=False`` and ``pooling="avg"`` unless ``args`` says otherwise, and
    ``weights=None`` unless ``args`` names weights (which then need the network to download).

    Args:
        name_of_application: the function's name in ``keras.applications``, e.g.
            ``MobileNetV3Small``.
        args: further keyword arguments for it (plain data).
        input_size: ``[height, width]`` to resize each image to first, or None.
        **kwargs: `keras.layers.Layer` arguments.

    Raises:
        ConfigError: an unknown application (path ``model.tower.block.name``).
    """

    def __init__(
        self,
        name_of_application: str,
        args: Mapping[str, Any] | None = None,
        input_size: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.name_of_application = _application(name_of_application, "model.tower.block.name")
        self.args = dict(args or {})
        self.input_size = [int(v) for v in input_size] if input_size else None
        self.resize = (
            keras.layers.Resizing(*self.input_size, name="resize", dtype=self.dtype_policy)
            if self.input_size
            else None
        )
        self.application = None

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape[1:])
        if self.resize is not None:
            self.resize.build(tuple(input_shape))
            shape = (*self.input_size, shape[-1])
        kwargs = {"include_top": False, "pooling": "avg", "weights": None, **self.args}
        kwargs["input_shape"] = shape
        build = getattr(keras.applications, self.name_of_application)
        self.application = build(**kwargs)

    def call(self, inputs: Any, training: Any = None) -> Any:
        x = self.resize(inputs) if self.resize is not None else inputs
        return self.application(x, training=training)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if self.application is None:
            self.build(input_shape)
        shape = tuple(input_shape)
        if self.input_size:
            shape = (shape[0], *self.input_size, shape[-1])
        return tuple(self.application.compute_output_shape(shape))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            name_of_application=self.name_of_application,
            args=dict(self.args),
            input_size=self.input_size,
        )
        return config


def _application(name: Any, path: str) -> str:
    known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
    if not isinstance(name, str) or name not in known:
        raise ConfigError(
            path,
            f"unknown Keras application {name!r}; expected one of keras.applications' "
            f"models, e.g. MobileNetV3Small, ResNet50 ({len(known)} in all)",
        )
    return name


def resolve_factory(ref: Any, path: str = "model.tower.block.factory") -> Callable[..., Any]:
    """Import the callable that ``"package.module:function"`` names.

    Args:
        ref: ``"module:attribute"`` (the attribute may be dotted: ``module:Class.method``).
        path: the config key path to name in errors.

    Returns:
        The callable.

    Raises:
        ConfigError: `ref` is not of that form, the module does not import, it has no such
            attribute, or the attribute is not callable. Each says which.
    """
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(path, f"must be 'package.module:function' (one colon), got {ref!r}")
    module_name, attribute = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error raised by the module's own code
        raise ConfigError(
            path,
            f"cannot import module {module_name!r}: {type(err).__name__}: {err} (is it on "
            "PYTHONPATH, or installed in this environment?)",
        ) from err
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ConfigError(
                path,
                f"module {module_name!r} has no attribute {attribute!r}; it defines "
                f"{', '.join(public[:12]) or 'nothing public'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            path,
            f"{ref!r} is not callable (it is a {type(obj).__name__}); name a function or class that "
            "returns a Keras layer or model",
        )
    return obj


class BlockSpec(Mapping):
    """A checked block spec: the block ``type`` and its options, immutable.

    It reads like the mapping it came from (``spec["type"]``, ``dict(spec)``); functions that
    take a spec skip the check when they get a `BlockSpec`, so a spec is checked once however
    many weight sets are built from it. Make one with `validate_block_spec`.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("BlockSpec is immutable; build a new one with validate_block_spec")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"BlockSpec({self._data!r})"

    def __reduce__(self) -> tuple:  # copy, deepcopy and pickle rebuild it through __init__
        return (BlockSpec, (self._data,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    __hash__ = None  # type: ignore[assignment]  # holds lists: not hashable, like a dict

    @property
    def type(self) -> str:
        return self._data["type"]

    @property
    def options(self) -> dict:
        """The keys besides ``type``, as a new dict."""
        return {k: v for k, v in self._data.items() if k != "type"}

    def to_dict(self) -> dict:
        """Plain data (for YAML dumps and `get_config`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._data.items()}


# The class each built-in type builds, and the keys of its YAML spec (besides `type`). The
# defaults of the keys are the class's constructor defaults: one place.
_BUILTIN: dict[str, tuple[type, tuple[str, ...]]] = {
    "mlp": (MLPBlock, ("units", "activation", "norm")),
    "conv2d": (
        Conv2DBlock,
        ("filters", "kernel_size", "pool_size", "norm", "activation", "dense"),
    ),
    "embedding": (
        EmbeddingBlock,
        ("vocab_size", "embedding_dim", "combiner", "units", "activation"),
    ),
    "gru": (SequenceBlock, ("units",)),
    "transformer": (SequenceBlock, ("units", "num_heads")),
}
_USER_KEYS = {"custom": ("factory", "args"), "keras_application": ("name", "args", "input_size")}


def block_keys(kind: str) -> tuple[str, ...]:
    """The keys a block of type `kind` accepts besides ``type``."""
    return _BUILTIN[kind][1] if kind in _BUILTIN else _USER_KEYS[kind]


def _defaults(kind: str) -> dict:
    cls, keys = _BUILTIN[kind]
    params = inspect.signature(cls.__init__).parameters
    return {k: params[k].default for k in keys if params[k].default is not inspect.Parameter.empty}


def _positive_int(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(path, f"must be a positive integer, got {value!r}")
    return value


def _positive_ints(value: Any, path: str) -> list[int]:
    return [_positive_int(v, f"{path}[{i}]") for i, v in enumerate(_seq(value))]


def validate_block_spec(spec: Any, path: str = "model.tower.block") -> BlockSpec:
    """Check a block spec and return it normalised, with every default filled in.

    Args:
        spec: plain data, e.g. ``{"type": "conv2d", "filters": [16, 32]}``, or a `BlockSpec`
            (returned as it is: it was checked when it was made).
        path: the config key path to name in errors.

    Returns:
        A `BlockSpec`. Built-in types get all their keys (the block class's defaults for the
        missing ones); ``custom`` gets ``args: {}``; ``keras_application`` gets ``args: {}``
        and ``input_size: null``.

    Raises:
        ConfigError: not a mapping, an unknown type or key, a bad value (``norm``, sizes that
            must be positive integers, an embedding without ``vocab_size``, ...), a ``custom``
            factory that does not import, is missing or is not callable (path
            ``<path>.factory``), an unknown Keras application (``<path>.name``).
    """
    if isinstance(spec, BlockSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(path, f"must be a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if kind not in BLOCK_TYPES:
        raise ConfigError(
            f"{path}.type", f"unknown block type {kind!r}; expected one of {', '.join(BLOCK_TYPES)}"
        )
    allowed = block_keys(kind)
    for key in spec:
        if key != "type" and key not in allowed:
            raise ConfigError(
                f"{path}.{key}", f"unknown key for a {kind} block" + hint(key, ("type", *allowed))
            )
    if kind in USER_BLOCK_TYPES:
        return _validate_user_spec(kind, spec, path)
    out = {"type": kind, **_defaults(kind), **{k: v for k, v in spec.items() if k != "type"}}
    if out.get("norm") not in NORMS:
        raise ConfigError(
            f"{path}.norm", f"unknown norm {out.get('norm')!r}; expected one of {NORMS}"
        )
    if kind == "embedding":
        if "vocab_size" not in spec:
            raise ConfigError(
                f"{path}.vocab_size", "an embedding block needs a positive vocab_size"
            )
        _positive_int(out["vocab_size"], f"{path}.vocab_size")
        _positive_int(out["embedding_dim"], f"{path}.embedding_dim")
        if out["combiner"] not in COMBINERS:
            raise ConfigError(
                f"{path}.combiner", f"got {out['combiner']!r}, expected one of {COMBINERS}"
            )
    for key in ("filters", "dense"):
        if key in out:
            out[key] = _positive_ints(out[key], f"{path}.{key}")
    if kind in ("gru", "transformer"):
        units = _positive_ints(out["units"], f"{path}.units")
        if len(units) != 1:
            raise ConfigError(f"{path}.units", f"a {kind} block has one width, got {units}")
        out["units"] = units[0]
        if kind == "transformer":
            _positive_int(out["num_heads"], f"{path}.num_heads")
    elif "units" in out:
        out["units"] = _positive_ints(out["units"], f"{path}.units")
    if kind == "conv2d":
        _positive_int(out["kernel_size"], f"{path}.kernel_size")
        if out["pool_size"] is not None:
            _positive_int(out["pool_size"], f"{path}.pool_size")
    return BlockSpec(out)


def _validate_user_spec(kind: str, spec: Mapping[str, Any], path: str) -> BlockSpec:
    args = spec.get("args") or {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ConfigError(f"{path}.args", f"must be a mapping of keyword arguments, got {args!r}")
    if kind == "custom":
        if "factory" not in spec:
            raise ConfigError(
                f"{path}.factory", "a custom block needs factory: 'package.module:function'"
            )
        resolve_factory(spec["factory"], f"{path}.factory")
        return BlockSpec({"type": kind, "factory": spec["factory"], "args": dict(args)})
    if "name" not in spec:
        raise ConfigError(f"{path}.name", "a keras_application block needs a name, e.g. ResNet50")
    name = _application(spec["name"], f"{path}.name")
    if "input_shape" in args:
        raise ConfigError(
            f"{path}.args.input_shape",
            "is set from the stream's shape; resize with input_size: [height, width] instead",
        )
    size = spec.get("input_size")
    if size is not None:
        size = _positive_ints(size, f"{path}.input_size")
        if len(size) != 2:
            raise ConfigError(f"{path}.input_size", f"must be [height, width], got {size}")
    return BlockSpec({"type": kind, "name": name, "args": dict(args), "input_size": size})


def build_block(
    spec: Mapping[str, Any],
    output_dim: int | None = None,
    name: str | None = None,
    path: str = "model.tower.block",
    dtype: Any = None,
) -> keras.layers.Layer:
    """Build one weight set of a block from its spec (the ``block:`` of a tower).

    Args:
        spec: a `BlockSpec`, or plain data that `validate_block_spec` checks first.
        output_dim: width of the final linear projection of a built-in block (None: none).
            ``custom`` and ``keras_application`` blocks end where they end; `SharedTower` adds
            the projection after them.
        name: the layer's name.
        path: the config key path to name in errors.
        dtype: the layer's dtype policy (None: the global one).

    Returns:
        A new layer with fresh weights.

    Raises:
        ConfigError: a bad spec (see `validate_block_spec`), or a ``custom`` factory that
            raises or returns something that is not a Keras layer (path ``<path>.factory``).
    """
    spec = validate_block_spec(spec, path)
    kind, options = spec.type, spec.options
    if kind == "custom":
        factory = resolve_factory(options["factory"], f"{path}.factory")
        try:
            layer = factory(**options["args"])
        except Exception as err:
            raise ConfigError(
                f"{path}.factory",
                f"{options['factory']}(**{options['args']!r}) raised {type(err).__name__}: {err}",
            ) from err
        if not isinstance(layer, keras.layers.Layer):
            raise ConfigError(
                f"{path}.factory",
                f"{options['factory']} returned a {type(layer).__name__}, not a Keras layer or "
                "model; it must return a new keras.layers.Layer (or keras.Model) on every call",
            )
        return layer
    kw: dict[str, Any] = {"name": name, "dtype": dtype}
    if kind == "keras_application":
        return KerasApplicationBlock(options["name"], options["args"], options["input_size"], **kw)
    kw["output_dim"] = output_dim
    if kind in ("gru", "transformer"):
        return SequenceBlock(kind=kind, **options, **kw)
    return _BUILTIN[kind][0](**options, **kw)


def check_block_input(
    spec: Mapping[str, Any], shape: Sequence[int | None], dtype: str, where: str
) -> None:
    """Check that a stream's per-example shape and dtype can feed the block.

    Args:
        spec: the block spec (plain data or `BlockSpec`).
        shape: the per-example shape (no batch axis).
        dtype: the stream's dtype name.
        where: names the stream (and key path) in errors.

    Raises:
        ConfigError: the block cannot take that input. ``custom`` blocks are not checked here
            (the layer itself raises when it is built on the stream).
    """
    kind = spec.get("type")
    shape = tuple(shape)
    is_int = "int" in str(dtype)
    if kind == "custom":
        return
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
    if kind == "keras_application":
        if len(shape) != 3:
            raise ConfigError(
                where,
                f"a Keras application needs shape [height, width, channels], got {list(shape)}",
            )
        size = spec.get("input_size") or shape[:2]
        if min(size) < 32:
            raise ConfigError(
                where,
                f"images of {shape[0]}x{shape[1]} are too small for the Keras applications "
                "(at least 32x32); add input_size: [32, 32] to the block to resize them",
            )
    elif kind == "conv2d":
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
