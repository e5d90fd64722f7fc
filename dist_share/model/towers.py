"""Weight sharing across input streams: one `SharedTower` layer, four sharing modes.

A tower owns one or more *weight sets* and decides which set each stream goes through:

=============  ====================  ===========================================
sharing        weight sets           stream i uses
=============  ====================  ===========================================
``shared``     1                     set 0
``separate``   N                     set i
``grouped``    len(groups)           the set of the group that contains i
``switchable`` 1 + N                 set 0 if ``use_shared`` else set 1 + i
=============  ====================  ===========================================

A weight set is either a built-in block made from plain data (`dist_share.model.blocks`) or a Keras
layer or model of your own: an instance (functional, Sequential or subclassed; it *is* set 0,
and the other sets are fresh-weight clones of it), a zero-argument factory called once per set,
or a list with one layer per set. `make_weight_sets` creates them; `SharedTower.call` applies
them.

Streams that share a set are *folded* (stacked on the batch axis and run through the set once)
unless ``fold=False``; the result is the same, but one large matmul/conv is much cheaper than N
small ones. Layers that mix the examples of a batch are converted or refused when folded (see
`dist_share.model.folding` and docs/TOWERS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from dist_share.errors import ConfigError
from dist_share.model import batched_sets
from dist_share.model.blocks.build import build_block
from dist_share.model.blocks.head import is_builtin_block
from dist_share.model.blocks.spec import BlockSpec, validate_block_spec
from dist_share.model.folding import convert_batch_norm, fold_streams, prepare_for_folding
from dist_share.model.serialization import register

SHARING_MODES = ("shared", "separate", "grouped", "switchable")

# What `block` may be: a plain-data spec, a layer, a factory, or one layer per weight set.
BlockLike = Mapping[str, Any] | keras.layers.Layer | Callable[[], Any] | Sequence[Any]


def validate_sharing(sharing: Any, path: str = "model.tower.sharing") -> str:
    """Check a sharing mode name.

    Args:
        sharing: one of `SHARING_MODES`.
        path: the config key path to name in errors.

    Returns:
        The mode.

    Raises:
        ConfigError: `sharing` is not a known mode.
    """
    if sharing not in SHARING_MODES:
        raise ConfigError(
            path, f"unknown sharing mode {sharing!r}; expected one of {', '.join(SHARING_MODES)}"
        )
    return sharing


def validate_groups(
    groups: Any, num_streams: int, path: str = "model.tower.groups"
) -> list[list[int]]:
    """Check that `groups` is a partition of ``range(num_streams)``: every stream in one group.

    Args:
        groups: a non-empty list of non-empty lists of stream indices.
        num_streams: how many streams the tower has.
        path: the config key path to name in errors.

    Returns:
        The groups as lists of ints.

    Raises:
        ConfigError: `groups` is not a list of lists, names a stream out of range or twice, or
            leaves a stream out (the path names the offending group where there is one).
    """
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ConfigError(
            path,
            f"grouped sharing needs a non-empty list of lists of stream indices, got {groups!r}",
        )
    seen: dict[int, int] = {}
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or not group:
            raise ConfigError(
                f"{path}[{g}]", f"must be a non-empty list of stream indices, got {group!r}"
            )
        for s in group:
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_streams:
                raise ConfigError(
                    f"{path}[{g}]", f"stream index {s!r} is not in range(0, {num_streams})"
                )
            if s in seen:
                raise ConfigError(f"{path}[{g}]", f"stream {s} is already in group {seen[s]}")
            seen[s] = g
        out.append([int(s) for s in group])
    missing = sorted(set(range(num_streams)) - set(seen))
    if missing:
        raise ConfigError(
            path,
            f"groups are not a partition of the {num_streams} streams: streams {missing} are in no group",
        )
    return out


def validate_tower_layout(
    sharing: Any, groups: Any, num_streams: Any, path: str = "model.tower"
) -> tuple[str, list[list[int]] | None]:
    """Check the sharing mode, the groups and the stream count together.

    Args:
        sharing: the sharing mode.
        groups: the groups (only with ``grouped``; None otherwise).
        num_streams: a positive int.
        path: the tower's config key path; errors name ``<path>.sharing`` / ``<path>.groups``.

    Returns:
        ``(sharing, groups)`` with groups normalised (None unless grouped).

    Raises:
        ConfigError: see `validate_sharing` and `validate_groups`; also groups given for a mode
            other than ``grouped``, and a non-positive stream count.
    """
    if not isinstance(num_streams, int) or isinstance(num_streams, bool) or num_streams < 1:
        raise ConfigError(path, f"num_streams must be a positive integer, got {num_streams!r}")
    sharing = validate_sharing(sharing, f"{path}.sharing")
    if sharing == "grouped":
        return sharing, validate_groups(groups, num_streams, f"{path}.groups")
    if groups is not None:
        raise ConfigError(
            f"{path}.groups",
            f"groups are only used with sharing: grouped (sharing is {sharing!r}); remove them",
        )
    return sharing, None


def weight_set_names(sharing: str, num_streams: int, groups: Sequence | None = None) -> list[str]:
    """Names of the weight sets of a tower, in set order (also their sub-layer names)."""
    if sharing == "shared":
        return ["shared"]
    if sharing == "separate":
        return [f"stream_{i}" for i in range(num_streams)]
    if sharing == "grouped":
        return [f"group_{g}" for g in range(len(groups or []))]
    return ["shared"] + [f"stream_{i}" for i in range(num_streams)]


def clone_with_fresh_weights(layer: keras.layers.Layer, path: str = "model.tower.block") -> Any:
    """A new, unbuilt-or-freshly-initialised layer with `layer`'s architecture.

    Functional and Sequential models go through ``keras.models.clone_model``; any other layer
    (a subclassed layer or model) through ``type(layer).from_config(layer.get_config())``. The
    clone's weights come from its initializers, not from `layer`.

    Args:
        layer: the layer to copy.
        path: the config key path to name in errors.

    Raises:
        ConfigError: the layer cannot be recreated from its config (typically a subclassed
            layer whose constructor takes arguments that ``get_config`` does not return); the
            message asks for a zero-argument factory instead.
    """
    try:
        is_graph_model = isinstance(layer, keras.Model) and (
            isinstance(layer, keras.Sequential) or getattr(layer, "_is_graph_network", False)
        )
        if is_graph_model:
            return keras.models.clone_model(layer)
        return type(layer).from_config(layer.get_config())
    except Exception as err:  # any failure to recreate: the remedy is the same
        raise ConfigError(
            path,
            f"cannot make another weight set from layer {layer.name!r} "
            f"({type(layer).__name__}) by cloning it: {type(err).__name__}: {err}. Pass a "
            "zero-argument factory that returns a new layer instead, e.g. "
            "SharedTower(lambda: make_encoder(), ...), or one layer per weight set as a list",
        ) from err


def _check_layer(obj: Any, path: str, what: str) -> keras.layers.Layer:
    if not isinstance(obj, keras.layers.Layer):
        raise ConfigError(
            path, f"{what} must be a Keras layer or model, got {type(obj).__name__}: {obj!r}"
        )
    return obj


def make_weight_sets(
    block: Any,
    names: Sequence[str],
    output_dim: int | None = None,
    dtype: Any = None,
    path: str = "model.tower.block",
) -> tuple[BlockSpec | None, list[keras.layers.Layer]]:
    """Create the weight sets of a tower from whatever `block` is.

    Args:
        block: a plain-data block spec (`blocks.spec.validate_block_spec`), a Keras layer or model
            instance (set 0 is that instance; the others are `clone_with_fresh_weights` copies),
            a zero-argument factory returning a new layer (called once per set), or a list of
            layers, one per set.
        names: the weight set names, in set order (`weight_set_names`).
        output_dim: passed to built-in blocks (user layers get a projection in the tower).
        dtype: dtype policy for built-in blocks.
        path: the config key path to name in errors.

    Returns:
        ``(spec, sets)``: the normalised spec (None for user layers) and the layers.

    Raises:
        ConfigError: a bad spec, a factory that returns no layer or the same layer twice, a
            list of the wrong length or with repeated layers, or an instance that cannot be
            cloned where several sets are needed.
    """
    n = len(names)
    if isinstance(block, Mapping):
        spec = validate_block_spec(block, path)
        sets = [build_block(spec, output_dim, name=nm, dtype=dtype, path=path) for nm in names]
        return spec, sets
    if isinstance(block, keras.layers.Layer):
        return None, [block] + [clone_with_fresh_weights(block, path) for _ in range(n - 1)]
    if isinstance(block, (list, tuple)):
        if len(block) != n:
            raise ConfigError(
                path,
                f"a list of layers needs one layer per weight set ({n}: {list(names)}), "
                f"got {len(block)}",
            )
        sets = [_check_layer(b, f"{path}[{i}]", "each entry") for i, b in enumerate(block)]
    elif callable(block):
        sets = []
        for i in range(n):
            made = block()
            sets.append(_check_layer(made, path, f"the factory's return value (call {i + 1})"))
    else:
        raise ConfigError(
            path,
            "must be a block spec (a mapping with a 'type' key), a Keras layer or model, a "
            f"zero-argument factory returning one, or a list of layers; got {block!r}",
        )
    if len({id(s) for s in sets}) != len(sets):
        raise ConfigError(
            path,
            "the same layer object appears in two weight sets; a factory must return a new "
            "layer on every call",
        )
    return None, sets


@register
class SharedTower(keras.layers.Layer):
    """Apply one block to N streams with shared, separate, grouped or switchable weights.

    Inputs are either a list of N tensors ``[B, ...]`` (output: a list of N tensors) or one
    tensor with a stream axis ``[B, N, ...]`` (output: ``[B, N, ...]``). The stacked form folds
    built-in blocks without any copy (a reshape), so prefer it when the data comes stacked.

    ``switchable`` keeps a non-trainable boolean variable ``use_shared``; assigning it between
    steps switches weight sets without retracing a ``tf.function``. A Python bool, tensor or
    variable passed as ``use_shared=`` to ``call`` overrides it. The unused sets receive zero
    gradient (the choice is a ``cond``, so the unused branch is not even computed).

    Args:
        block: what each weight set is (see `make_weight_sets`): a plain-data spec such as
            ``{"type": "conv2d", "filters": [16, 32]}``; a Keras layer or model (functional,
            Sequential or subclassed), which is the shared weight set itself; a zero-argument
            factory returning a new layer, for modes with several sets; or a list with one
            layer per set. Given an instance where several sets are needed, the other sets are
            clones with fresh weights.
        num_streams: how many streams the tower takes.
        sharing: ``shared``, ``separate``, ``grouped`` or ``switchable``.
        groups: for ``grouped``: a partition of ``range(num_streams)``.
        fold: run each weight set once on its streams stacked on the batch axis. User layers
            are made exact for it first (`folding.prepare_for_folding`: BatchNormalization is
            converted in place, layers that mix the batch otherwise are refused). Sets that are
            not folded get their BatchNormalization converted too (`folding.convert_batch_norm`:
            global batch statistics), and nothing refused.
        use_shared: for ``switchable``: the initial value of the flag.
        batch_sets: ``separate`` and ``grouped`` towers of MLP blocks run all their weight
            sets as one batched matmul per layer instead of one set after another, with the
            same per-set variables (see `dist_share.model.batched_sets` for what qualifies). Off by
            default: on CPU, TensorFlow's batched matmul and its gradient were slower than N
            matmuls (0.3-0.9x, benchmarks/bench_batched_sets.py); it is for accelerators,
            where N small kernels cost N launches.
        output_dim: built-in blocks end in a linear projection to this width; user layers get
            a ``Dense(output_dim)`` per weight set after them (None: no projection).
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Raises:
        ConfigError: a bad block, sharing mode, groups or stream count (the path names the
            key), or a user layer that cannot be cloned or folded exactly (a `FoldingError`,
            raised when the tower is built).
    """

    def __init__(
        self,
        block: BlockLike,
        num_streams: int,
        sharing: str = "shared",
        groups: Sequence[Sequence[int]] | None = None,
        fold: bool = True,
        use_shared: bool = True,
        output_dim: int | None = None,
        batch_sets: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sharing, self.groups = validate_tower_layout(sharing, groups, num_streams)
        self.batch_sets = bool(batch_sets)
        self.num_streams = num_streams
        self.fold = bool(fold)
        self.use_shared_init = bool(use_shared)
        self.output_dim = int(output_dim) if output_dim else None
        names = weight_set_names(self.sharing, num_streams, self.groups)
        self.block_spec, self.blocks = make_weight_sets(
            block, names, self.output_dim, self.dtype_policy
        )
        # Built-in blocks take num_streams in call; anything else (a user layer, a custom or
        # keras_application block) reads the fold from `folding.fold_streams`.
        self.user_blocks = not is_builtin_block(self.blocks[0])
        # User layers end where the user says; the embedding width is a projection of ours.
        self.projections = (
            [
                keras.layers.Dense(
                    self.output_dim, name=f"{nm}_projection", dtype=self.dtype_policy
                )
                for nm in names
            ]
            if self.user_blocks and self.output_dim
            else []
        )
        # user BatchNormalization layers converted to FoldedBatchNormalization, by path
        self.folded_layers: list[str] = []
        self.use_shared = None

    # -- weight sets -------------------------------------------------------------------------
    @property
    def num_weight_sets(self) -> int:
        return len(self.blocks)

    def weight_set_layers(self, set_index: int) -> list[keras.layers.Layer]:
        """The layers that make up weight set `set_index` (the block, then its projection)."""
        extra = [self.projections[set_index]] if self.projections else []
        return [self.blocks[set_index], *extra]

    def stream_weight_set(self, stream: int) -> int:
        """The weight set stream `stream` goes through now (for ``switchable``: by the flag's
        current value)."""
        if self.sharing == "switchable":
            shared = self.use_shared is None or bool(self.use_shared.numpy())
            return 0 if shared else stream + 1
        return self._first_set_of(stream)

    def _first_set_of(self, stream: int) -> int:
        return next(i for i in range(len(self.blocks)) if stream in self._set_streams(i))

    def apply_stream(self, x: Any, stream: int, training: Any = None) -> Any:
        """Stream `stream`'s weight set on ``x`` alone: one stream in, its embedding out (the
        tower of an export, `families.base.Tower`)."""
        return self._call_set(self.stream_weight_set(stream), x, 1, training)

    def _set_streams(self, set_index: int) -> list[int]:
        """Streams that go through weight set `set_index`."""
        if self.sharing == "shared":
            return list(range(self.num_streams))
        if self.sharing == "grouped":
            return self.groups[set_index]
        if self.sharing == "switchable" and set_index == 0:
            return list(range(self.num_streams))
        offset = 1 if self.sharing == "switchable" else 0
        return [set_index - offset]

    @staticmethod
    def _is_shape_list(shape: Any) -> bool:
        return (
            isinstance(shape, (list, tuple))
            and len(shape) > 0
            and all(isinstance(e, (list, tuple)) for e in shape)
        )

    def _stream_shapes(self, input_shape: Any) -> list[tuple]:
        if self._is_shape_list(input_shape):
            shapes = [tuple(s) for s in input_shape]
            if len(shapes) != self.num_streams:
                raise ValueError(
                    f"{self.name}: expected {self.num_streams} streams, got {len(shapes)}"
                )
            if self.sharing != "separate" and len({s[1:] for s in shapes}) > 1:
                raise ValueError(
                    f"{self.name}: streams that share weights need equal shapes, got {shapes}"
                )
            return shapes
        if len(input_shape) < 2 or input_shape[1] != self.num_streams:
            raise ValueError(
                f"{self.name}: a stacked input needs shape [B, {self.num_streams}, ...], got {input_shape}"
            )
        return [(input_shape[0],) + tuple(input_shape[2:])] * self.num_streams

    def build(self, input_shape: Any) -> None:
        shapes = self._stream_shapes(input_shape)
        for i, block in enumerate(self.blocks):
            streams = self._set_streams(i)
            if not block.built:
                block.build(shapes[streams[0]])
            if self.user_blocks and self.fold and len(streams) > 1:
                self.folded_layers += prepare_for_folding(block)
            elif self.user_blocks:
                # Not folded, but batch statistics still span every replica's rows.
                self.folded_layers += convert_batch_norm(block)
        for i, projection in enumerate(self.projections):
            out = self._user_output_shape(i, shapes[self._set_streams(i)[0]])
            projection.build(out)
        if self.sharing == "switchable":
            self.use_shared = self.add_weight(
                shape=(),
                dtype="bool",
                initializer="ones" if self.use_shared_init else "zeros",
                trainable=False,
                name="use_shared",
            )

    def _user_output_shape(self, set_index: int, shape: tuple) -> tuple:
        block = self.blocks[set_index]
        try:
            return tuple(block.compute_output_shape(shape))
        except Exception:  # subclassed layers often leave compute_output_shape out
            spec = block.compute_output_spec(keras.KerasTensor(shape))
            return tuple(spec.shape)

    # -- application -------------------------------------------------------------------------
    def _call_set(self, set_index: int, x: Any, num_streams: int, training: Any) -> Any:
        """Weight set `set_index` on a batch of `num_streams` streams stacked stream-major."""
        block = self.blocks[set_index]
        if not self.user_blocks:
            return block(x, training=training, num_streams=num_streams, stream_major=True)
        with fold_streams(num_streams):
            y = block(x, training=training)
        return self.projections[set_index](y) if self.projections else y

    def _apply_set(
        self, set_index: int, streams: list[int], xs: Any, stacked: bool, training: Any
    ) -> dict:
        """Run one weight set on some streams; returns {stream: output [B, ...]}."""
        k = len(streams)
        if k == 1 or not self.fold:
            out = {}
            for s in streams:
                x = xs[:, s] if stacked else xs[s]
                out[s] = self._call_set(set_index, x, 1, training)
            return out
        if stacked and not self.user_blocks:
            # Built-in blocks take the stream-minor layout: [B, k, ...] -> [B*k, ...] is free.
            everything = streams == list(range(self.num_streams))
            part = xs if everything else ops.take(xs, streams, axis=1)
            per_example = tuple(part.shape[2:])
            y = self.blocks[set_index](
                ops.reshape(part, (-1,) + per_example),
                training=training,
                num_streams=k,
                stream_major=False,
            )
            y = ops.reshape(y, (-1, k) + tuple(y.shape[1:]))
            return {s: y[:, j] for j, s in enumerate(streams)}
        if stacked:
            # User layers get the stream-major layout, which survives any reshape of the batch
            # a layer may do inside (TimeDistributed, say): transpose, then fold.
            part = ops.take(xs, streams, axis=1)
            part = ops.moveaxis(part, 1, 0)
            x = ops.reshape(part, (-1,) + tuple(part.shape[2:]))
        else:
            x = ops.concatenate([xs[s] for s in streams], axis=0)
        y = self._call_set(set_index, x, k, training)
        return dict(zip(streams, ops.split(y, k, axis=0), strict=True))

    def _apply_sets(self, set_indices: list[int], xs: Any, stacked: bool, training: Any) -> Any:
        """Per-stream outputs of the sets `set_indices` (a list), or, when the input is stacked
        and the batched path takes all streams in order, the stacked ``[B, N, ...]`` output."""
        streams = [self._set_streams(i) for i in set_indices]
        blocks = [self.blocks[i] for i in set_indices]
        if self.batch_sets and batched_sets.can_batch(blocks, streams):
            return self._apply_sets_batched(blocks, streams, xs, stacked)
        out: dict[int, Any] = {}
        for i in set_indices:
            out.update(self._apply_set(i, self._set_streams(i), xs, stacked, training))
        return [out[s] for s in range(self.num_streams)]

    def _apply_sets_batched(
        self, blocks: list, streams: list[list[int]], xs: Any, stacked: bool
    ) -> Any:
        """Every set at once (`batched_sets.apply_batched`); a set's streams are concatenated
        on the batch axis (stream-major), as the folded path does."""
        if stacked and streams == [[s] for s in range(self.num_streams)]:
            # One stream per set, in order: [B, N, ...] -> [N, B, ...] and back are one
            # transpose each, where N slices and a stack (and their gradients, each a full-size
            # zero tensor per slice) cost more than the batched matmul saves.
            y = batched_sets.apply_batched(blocks, ops.moveaxis(xs, 1, 0))
            return ops.moveaxis(y, 0, 1)

        def rows(s: int) -> Any:
            return xs[:, s] if stacked else xs[s]

        inputs = [
            rows(ss[0]) if len(ss) == 1 else ops.concatenate([rows(s) for s in ss], axis=0)
            for ss in streams
        ]
        outs = ops.unstack(batched_sets.apply_batched(blocks, inputs), axis=0)
        result: dict[int, Any] = {}
        for ss, y in zip(streams, outs, strict=True):
            parts = [y] if len(ss) == 1 else ops.split(y, len(ss), axis=0)
            result.update(zip(ss, parts, strict=True))
        return [result[s] for s in range(self.num_streams)]

    def _stacked_shared(self, xs: Any, training: Any) -> Any:
        """Shared built-in block on a stacked input: one reshape in, one reshape out, no copies."""
        n = self.num_streams
        per_example = tuple(xs.shape[2:])
        y = self.blocks[0](
            ops.reshape(xs, (-1,) + per_example),
            training=training,
            num_streams=n,
            stream_major=False,
        )
        return ops.reshape(y, (-1, n) + tuple(y.shape[1:]))

    def call(self, inputs: Any, training: Any = None, use_shared: Any = None) -> Any:
        stacked = not isinstance(inputs, (list, tuple))
        xs = inputs if stacked else list(inputs)
        if not stacked and len(xs) != self.num_streams:
            raise ValueError(f"{self.name}: expected {self.num_streams} streams, got {len(xs)}")

        def finish(outs: Any) -> Any:
            if not isinstance(outs, list):
                return outs  # already stacked (the batched path)
            return ops.stack(outs, axis=1) if stacked else outs

        def shared_path() -> Any:
            if stacked and self.fold and self.num_streams > 1 and not self.user_blocks:
                return self._stacked_shared(xs, training)
            return finish(self._apply_sets([0], xs, stacked, training))

        if self.sharing == "shared":
            return shared_path()
        if self.sharing in ("separate", "grouped"):
            return finish(self._apply_sets(list(range(len(self.blocks))), xs, stacked, training))

        def separate_path() -> Any:
            return finish(self._apply_sets(list(range(1, len(self.blocks))), xs, stacked, training))

        flag = self.use_shared if use_shared is None else use_shared
        if isinstance(flag, bool):
            return shared_path() if flag else separate_path()
        # tf.cond rather than ops.cond: a Keras variable is not accepted as a predicate there,
        # and tf.cond gives the untaken branch's variables zero gradient without computing it.
        pred = tf.cast(ops.convert_to_tensor(flag), tf.bool)
        if stacked:
            return tf.cond(pred, shared_path, separate_path)
        return list(tf.cond(pred, lambda: tuple(shared_path()), lambda: tuple(separate_path())))

    def compute_output_shape(self, input_shape: Any) -> Any:
        if self._is_shape_list(input_shape):
            per_stream = [tuple(s) for s in input_shape]
        else:
            per_stream = [(input_shape[0],) + tuple(input_shape[2:])] * self.num_streams
        outs = []
        for s, shape in enumerate(per_stream):
            set_index = self._first_set_of(s)
            if not self.user_blocks:
                outs.append(tuple(self.blocks[set_index].compute_output_shape(shape)))
            elif self.projections:
                outs.append(
                    tuple(self._user_output_shape(set_index, shape)[:-1]) + (self.output_dim,)
                )
            else:
                outs.append(self._user_output_shape(set_index, shape))
        if self._is_shape_list(input_shape):
            return outs
        return (input_shape[0], self.num_streams) + tuple(outs[0][1:])

    def compute_output_spec(self, inputs: Any, training: Any = None, use_shared: Any = None) -> Any:
        if not self.user_blocks:
            return super().compute_output_spec(inputs, training=training, use_shared=use_shared)
        # A user layer may change the dtype (an int id encoder returns floats; a float32 head
        # under mixed precision): ask each set symbolically rather than assume the tower's.
        stacked = not isinstance(inputs, (list, tuple))
        per_stream = (
            [keras.KerasTensor((inputs.shape[0],) + tuple(inputs.shape[2:]), inputs.dtype)]
            * self.num_streams
            if stacked
            else list(inputs)
        )
        outs = []
        for s, x in enumerate(per_stream):
            set_index = self._first_set_of(s)
            y = self.blocks[set_index].compute_output_spec(x)
            if self.projections:
                y = self.projections[set_index].compute_output_spec(y)
            outs.append(y)
        if not stacked:
            return outs
        return keras.KerasTensor(
            (inputs.shape[0], self.num_streams) + tuple(outs[0].shape[1:]), outs[0].dtype
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_streams=self.num_streams,
            sharing=self.sharing,
            groups=self.groups,
            fold=self.fold,
            use_shared=self.use_shared_init,
            output_dim=self.output_dim,
            batch_sets=self.batch_sets,
        )
        if self.block_spec is not None:
            config["block"] = self.block_spec.to_dict()
        else:
            # Every set is saved, so a load rebuilds exactly these layers (no cloning or factory).
            config["block"] = [keras.saving.serialize_keras_object(b) for b in self.blocks]
        return config

    @classmethod
    def from_config(cls, config: dict) -> SharedTower:
        config = dict(config)
        block = config.pop("block")
        if isinstance(block, list):
            block = [keras.saving.deserialize_keras_object(b) for b in block]
        return cls(block=block, **config)
