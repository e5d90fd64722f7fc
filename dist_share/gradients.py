"""What replicas send: sparse-gradient dedup, the dense switch, compression, byte counting, reduction.

A shared embedding table used by S streams gives an IndexedSlices gradient with S x batch rows,
most of them repeats of a few ids. Both Horovod (allgather) and tf.distribute (all-gather of
IndexedSlices) ship every row, so traffic grows with streams x batch. Summing duplicate rows
first (`dedup_indexed_slices`) makes it grow with the number of *distinct* ids, and once a
gradient touches most of the table a plain dense allreduce is cheaper (`dense_threshold`).

All functions run in replica context inside the train step. The caller reduces gradients here
and then applies them with an optimizer whose own cross-replica sum is switched off
(`take_over_reduction`), so that clipping and loss-scale checks see the reduced gradient and
the byte count is the real payload.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

if TYPE_CHECKING:
    from dist_share.config import StrategyConfig

COMPRESSIONS = {"none": None, "fp16": tf.float16, "bf16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class GradientOptions:
    """How gradients are prepared and reduced (``strategy.sparse`` and ``strategy.horovod``)."""

    dedup: bool = True
    dense_threshold: float | None = 0.5
    compression: str = "none"
    op: str = "average"
    grouped_allreduce: bool = True
    sparse_as_dense: bool = False

    @classmethod
    def from_config(cls, strategy: StrategyConfig) -> GradientOptions:
        """The options of a validated ``strategy`` section (``sparse`` and ``horovod``)."""
        return cls(
            dedup=strategy.sparse.dedup,
            dense_threshold=strategy.sparse.dense_threshold,
            compression=strategy.horovod.compression,
            op=strategy.horovod.op,
            grouped_allreduce=strategy.horovod.grouped_allreduce,
            sparse_as_dense=strategy.horovod.sparse_as_dense,
        )


def dedup_indexed_slices(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """Sum rows that share an index, so each distinct row is sent once."""
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, grad.dense_shape)


def static_density(grad: tf.IndexedSlices) -> float | None:
    """Upper bound on the fraction of rows touched, from static shapes (None if unknown).

    The dense/sparse decision must be the same on every replica, or the replicas would enter
    different collectives and hang; static shapes are identical everywhere, runtime counts are not.
    """
    n = grad.indices.shape[0]
    rows = grad.dense_shape
    rows = tf.get_static_value(rows) if rows is not None else None
    if n is None or rows is None or int(rows[0]) == 0:
        return None
    return min(1.0, n / int(rows[0]))


def prepare_gradient(grad: Any, options: GradientOptions, allow_sparse: bool = True) -> Any:
    """Densify or dedup one gradient according to the options (dense gradients pass through)."""
    if not isinstance(grad, tf.IndexedSlices):
        return grad
    density = static_density(grad)
    if (
        not allow_sparse
        or options.sparse_as_dense
        or (
            options.dense_threshold is not None
            and density is not None
            and density >= options.dense_threshold
        )
    ):
        return tf.convert_to_tensor(grad)
    return dedup_indexed_slices(grad) if options.dedup else grad


def comm_bytes(grads: Sequence[Any]) -> tf.Tensor:
    """Bytes one replica hands to the collective: values + indices for IndexedSlices, size for dense."""
    total = tf.constant(0, tf.int64)
    for g in grads:
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):
            total += tf.size(g.values, tf.int64) * g.values.dtype.size
            total += tf.size(g.indices, tf.int64) * g.indices.dtype.size
        else:
            total += tf.size(g, tf.int64) * g.dtype.size
    return total


def _compress(g: Any, dtype: tf.DType | None) -> Any:
    if dtype is None or g is None:
        return g
    if isinstance(g, tf.IndexedSlices):
        if not g.values.dtype.is_floating:
            return g
        return tf.IndexedSlices(tf.cast(g.values, dtype), g.indices, g.dense_shape)
    return tf.cast(g, dtype) if g.dtype.is_floating else g


def _decompress(g: Any, like: Any) -> Any:
    if g is None:
        return g
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(tf.cast(g.values, like.dtype), g.indices, g.dense_shape)
    return tf.cast(g, like.dtype)


def reduce_gradients(
    grads: Sequence[Any],
    options: GradientOptions,
    backend: str,
    hvd: Any = None,
) -> tuple[list[Any], tf.Tensor]:
    """Prepare and all-reduce gradients across replicas; returns (reduced grads, bytes sent).

    backend 'none' (one replica) only prepares them. backend 'tf_distribute' sums with the
    replica context's all_reduce (the loss was divided by the global batch). backend 'horovod'
    uses Horovod collectives with `options.op`: 'sum' when the loss was divided by the global
    batch, 'average' when by the per-replica batch.
    """
    prepared = [prepare_gradient(g, options) for g in grads]
    dtype = COMPRESSIONS[options.compression] if backend == "horovod" else None
    wire = [_compress(g, dtype) for g in prepared]
    nbytes = comm_bytes(wire)
    if backend == "none":
        reduced = wire
    elif backend == "tf_distribute":
        reduced = _reduce_tf_distribute(wire)
    elif backend == "horovod":
        reduced = _reduce_horovod(wire, options, hvd)
    else:
        raise ValueError(f"unknown reduction backend {backend!r}")
    return [_decompress(r, g) for r, g in zip(reduced, prepared, strict=True)], nbytes


def _reduce_tf_distribute(grads: list[Any]) -> list[Any]:
    ctx = tf.distribute.get_replica_context()
    present = [i for i, g in enumerate(grads) if g is not None]
    if ctx is None or not present:
        return list(grads)
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
    out = list(grads)
    for i, r in zip(present, summed, strict=True):
        out[i] = r
    return out


def _reduce_horovod(grads: list[Any], options: GradientOptions, hvd: Any) -> list[Any]:
    op = hvd.Average if options.op == "average" else hvd.Sum
    out = list(grads)
    dense = [
        i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)
    ]
    if dense:
        if options.grouped_allreduce:
            red = hvd.grouped_allreduce([grads[i] for i in dense], op=op, name="dist_share_grads")
        else:
            red = [hvd.allreduce(grads[i], op=op, name=f"dist_share_grad_{i}") for i in dense]
        for i, r in zip(dense, red, strict=True):
            out[i] = r
    for i, g in enumerate(grads):
        if isinstance(g, tf.IndexedSlices):
            values = hvd.allgather(g.values, name=f"dist_share_sparse_values_{i}")
            indices = hvd.allgather(g.indices, name=f"dist_share_sparse_indices_{i}")
            if options.op == "average":
                values = values / tf.cast(hvd.size(), values.dtype)
            out[i] = tf.IndexedSlices(values, indices, g.dense_shape)
    return out


def set_optimizer_reduction(optimizer: Any, reduce: Any) -> Any:
    """Replace the Keras 3 TF optimizer's cross-replica gradient reduction with ``reduce``.

    Keras 3's TF optimizer passes every (gradient, variable) list through one private hook,
    ``_all_reduce_sum_gradients``, in replica context before the update; it is the only seam
    through which `apply` can reduce differently. This is the one place that touches it.
    ``reduce`` takes and returns a list of (gradient, variable) pairs.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner._all_reduce_sum_gradients = reduce
    return optimizer


def take_over_reduction(optimizer: Any) -> Any:
    """Switch off the optimizer's own cross-replica SUM: the custom loop already reduced.

    Reducing ourselves first lets us dedup/densify/compress, clip the *global* gradient and
    count bytes; leaving Keras's sum on as well would add the already-summed gradient N times.
    """
    return set_optimizer_reduction(optimizer, list)
