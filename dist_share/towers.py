"""Weight sharing across input streams: one `SharedTower` layer, four sharing modes.

A tower owns one or more *weight sets* (instances of the same block) and decides which set each
stream goes through:

=============  ====================  ===========================================
sharing        weight sets           stream i uses
=============  ====================  ===========================================
``shared``     1                     set 0
``separate``   N                     set i
``grouped``    len(groups)           the set of the group that contains i
``switchable`` 1 + N                 set 0 if ``use_shared`` else set 1 + i
=============  ====================  ===========================================

Streams that share a set are *folded* (stacked on the batch axis and run through the block
once) unless ``fold=False``; the result is the same, but one large matmul/conv is much cheaper
than N small ones. See docs/TOWERS.md for the normalisation semantics under folding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from dist_share import batched_sets
from dist_share.blocks import build_block, validate_block_spec
from dist_share.errors import ConfigError

SHARING_MODES = ("shared", "separate", "grouped", "switchable")


def validate_groups(
    groups: Any, num_streams: int, path: str = "model.tower.groups"
) -> list[list[int]]:
    """Groups must be a partition of range(num_streams): every stream in exactly one group."""
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


@keras.saving.register_keras_serializable(package="dist_share")
class SharedTower(keras.layers.Layer):
    """Apply a block to N streams with shared, separate, grouped or switchable weights.

    Inputs are either a list of N tensors ``[B, ...]`` (output: a list of N tensors) or one
    tensor with a stream axis ``[B, N, ...]`` (output: ``[B, N, D]``). The stacked form folds
    without any copy (a reshape), so prefer it when the data already comes stacked.

    ``switchable`` keeps a non-trainable boolean variable ``use_shared``; assigning it between
    steps switches weight sets without retracing a ``tf.function``. A Python bool, tensor or
    variable passed as ``use_shared=`` to ``call`` overrides it. The unused sets receive zero
    gradient (the choice is a ``cond``, so the unused branch is not even computed).

    ``batch_sets`` (default False): ``separate`` and ``grouped`` towers of MLP blocks run all
    their weight sets as one batched matmul per layer instead of one set after another, with
    the same per-set variables (see `dist_share.batched_sets` for what qualifies). Off by
    default: on CPU, TensorFlow's batched matmul and its gradient were slower than N matmuls
    (0.3-0.9x, benchmarks/bench_batched_sets.py); it is for accelerators, where N small
    kernels cost N launches.
    """

    def __init__(
        self,
        block: Mapping[str, Any],
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
        self.batch_sets = bool(batch_sets)
        if sharing not in SHARING_MODES:
            raise ConfigError(
                "model.tower.sharing",
                f"unknown sharing mode {sharing!r}; expected one of {SHARING_MODES}",
            )
        if not isinstance(num_streams, int) or num_streams < 1:
            raise ConfigError(
                "model.tower", f"num_streams must be a positive integer, got {num_streams!r}"
            )
        self.block_spec = validate_block_spec(block)
        self.num_streams = num_streams
        self.sharing = sharing
        self.fold = bool(fold)
        self.use_shared_init = bool(use_shared)
        self.output_dim = int(output_dim) if output_dim else None
        n = num_streams
        if sharing == "grouped":
            self.groups = validate_groups(groups, n)
        elif groups is not None and sharing != "grouped":
            raise ConfigError(
                "model.tower.groups", f"groups are only used with sharing: grouped, not {sharing!r}"
            )
        else:
            self.groups = None
        if sharing == "shared":
            names = ["shared"]
        elif sharing == "separate":
            names = [f"stream_{i}" for i in range(n)]
        elif sharing == "grouped":
            names = [f"group_{g}" for g in range(len(self.groups))]
        else:
            names = ["shared"] + [f"stream_{i}" for i in range(n)]
        self.blocks = [
            build_block(self.block_spec, self.output_dim, name=nm, dtype=self.dtype_policy)
            for nm in names
        ]
        self.use_shared = None

    # -- weight sets -------------------------------------------------------------------------
    @property
    def num_weight_sets(self) -> int:
        return len(self.blocks)

    @staticmethod
    def _is_shape_list(shape: Any) -> bool:
        return (
            isinstance(shape, (list, tuple))
            and len(shape) > 0
            and all(isinstance(e, (list, tuple)) for e in shape)
        )

    def build(self, input_shape: Any) -> None:
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
        else:
            if len(input_shape) < 2 or input_shape[1] != self.num_streams:
                raise ValueError(
                    f"{self.name}: a stacked input needs shape [B, {self.num_streams}, ...], got {input_shape}"
                )
            shapes = [(input_shape[0],) + tuple(input_shape[2:])] * self.num_streams
        for i, block in enumerate(self.blocks):
            stream = self._set_streams(i)[0]
            block.build(shapes[stream])
        if self.sharing == "switchable":
            self.use_shared = self.add_weight(
                shape=(),
                dtype="bool",
                initializer="ones" if self.use_shared_init else "zeros",
                trainable=False,
                name="use_shared",
            )

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

    # -- application -------------------------------------------------------------------------
    def _apply_set(
        self, block: Any, streams: list[int], xs: Any, stacked: bool, training: Any
    ) -> dict:
        """Run one weight set on some streams; returns {stream: output [B, D]}."""
        k = len(streams)
        if k == 1 or not self.fold:
            out = {}
            for s in streams:
                x = xs[:, s] if stacked else xs[s]
                out[s] = block(x, training=training)
            return out
        if stacked:
            everything = streams == list(range(self.num_streams))
            part = xs if everything else ops.take(xs, streams, axis=1)
            per_example = tuple(part.shape[2:])
            # [B, k, ...] -> [B*k, ...] is a free reshape; the block sees stream-minor order.
            y = block(
                ops.reshape(part, (-1,) + per_example),
                training=training,
                num_streams=k,
                stream_major=False,
            )
            y = ops.reshape(y, (-1, k) + tuple(y.shape[1:]))
            return {s: y[:, j] for j, s in enumerate(streams)}
        y = block(
            ops.concatenate([xs[s] for s in streams], axis=0),
            training=training,
            num_streams=k,
            stream_major=True,
        )
        parts = ops.split(y, k, axis=0)
        return dict(zip(streams, parts, strict=True))

    def _apply_sets(self, set_indices: list[int], xs: Any, stacked: bool, training: Any) -> list:
        streams = [self._set_streams(i) for i in set_indices]
        blocks = [self.blocks[i] for i in set_indices]
        if self.batch_sets and batched_sets.can_batch(blocks, streams):
            return self._apply_sets_batched(blocks, streams, xs, stacked)
        out: dict[int, Any] = {}
        for i in set_indices:
            out.update(self._apply_set(self.blocks[i], self._set_streams(i), xs, stacked, training))
        return [out[s] for s in range(self.num_streams)]

    def _apply_sets_batched(
        self, blocks: list, streams: list[list[int]], xs: Any, stacked: bool
    ) -> list:
        """Every set at once (`batched_sets.apply_batched`); a set's streams are concatenated
        on the batch axis (stream-major), as the folded path does."""

        def rows(s: int) -> Any:
            return xs[:, s] if stacked else xs[s]

        inputs = [
            rows(ss[0]) if len(ss) == 1 else ops.concatenate([rows(s) for s in ss], axis=0)
            for ss in streams
        ]
        outs = batched_sets.apply_batched(blocks, inputs)
        result: dict[int, Any] = {}
        for ss, y in zip(streams, outs, strict=True):
            parts = [y] if len(ss) == 1 else ops.split(y, len(ss), axis=0)
            result.update(zip(ss, parts, strict=True))
        return [result[s] for s in range(self.num_streams)]

    def _stacked_shared(self, xs: Any, training: Any) -> Any:
        """Shared weights on a stacked input: one reshape in, one reshape out, no copies."""
        n = self.num_streams
        per_example = tuple(xs.shape[2:])
        block = self.blocks[0]
        y = block(
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

        def finish(outs: list) -> Any:
            return ops.stack(outs, axis=1) if stacked else outs

        def shared_path() -> Any:
            if stacked and self.fold and self.num_streams > 1:
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
            return [tuple(self.blocks[0].compute_output_shape(tuple(s))) for s in input_shape]
        per = (input_shape[0],) + tuple(input_shape[2:])
        out = self.blocks[0].compute_output_shape(per)
        return (input_shape[0], self.num_streams) + tuple(out[1:])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            block=dict(self.block_spec),
            num_streams=self.num_streams,
            sharing=self.sharing,
            groups=self.groups,
            fold=self.fold,
            use_shared=self.use_shared_init,
            output_dim=self.output_dim,
            batch_sets=self.batch_sets,
        )
        return config
