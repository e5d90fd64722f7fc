"""What replicas send: sparse-gradient dedup, the dense switch, compression, byte counting, reduction.

A shared embedding table used by S streams gives an IndexedSlices gradient with S x batch rows,
most of them repeats of a few ids. Both Horovod (allgather) and tf.distribute (all-gather of
IndexedSlices) ship every row, so traffic grows with streams x batch. Summing duplicate rows
first (`dedup_indexed_slices`) makes it grow with the number of *distinct* ids; once the rows
all replicas send together cost more than all-reducing the whole table, the table is sent dense.

The dense switch (``strategy.sparse.dense_switch``)
---------------------------------------------------
``measured`` (default) decides from the rows actually sent, agreed by every replica:

1. every replica counts the rows it would send (distinct ids after dedup);
2. one small all-reduce sums those counts (one float64 per sparse gradient, one collective for
   all of them), so every replica sees the same total ``n`` and takes the same branch: replicas
   entering different collectives would hang;
3. the cost model below picks all-gather of the rows or ring all-reduce of the dense table.

Cost model (bytes through one worker's link per step; W replicas, the dense table ``T`` bytes,
a row ``r`` bytes = row values + one index, ``P = n x r`` the rows of all replicas together):

* sparse all-gather: every worker receives every other worker's rows, ``P - p_i`` bytes, about
  ``(W - 1) / W x P`` when the replicas send similar amounts. This grows with W: each new
  worker adds its rows to everybody's download;
* dense ring all-reduce: ``2 (W - 1) / W x T`` sent and as much received (reduce-scatter then
  all-gather of W chunks), nearly ``2 T`` whatever W is;
* so for W >= 2 the rows are sent sparse while ``P <= 2 T`` (`dense_wins`). For W = 1 nothing
  crosses a link and the smaller payload (``p <= T``) is kept, as it is also the cheaper
  gradient to build and to apply. Latency terms (one per collective) are the same on both
  sides up to the count all-reduce, which is 8 bytes per sparse gradient.

Example (bench_comm, Zipf ids, 16 streams x 4096 ids into a 100,000 x 64 float32 table):
2.06 MB of deduplicated rows per worker against a 25.6 MB table: the all-gather receives
2.06 (W - 1) MB per worker, the all-reduce about 51.2 (W - 1) / W MB, so sparse wins up to
W = 24 and dense from W = 25 on.

In the dense branch the sparse collective still carries one zero row (all-gathering IndexedSlices
that are empty on *every* replica crashes TensorFlow 2.21's MirroredStrategy); in the sparse
branch the dense all-reduce carries a [0, ...] tensor. `comm_bytes` counts what the taken branch
really hands to the collectives, the count all-reduce included.

``static`` is the fallback rule of earlier versions, used where no count can be agreed on
(``dense_switch: static``): densify when the static bound on the density (lookups / table rows,
from shapes that are identical on every replica) is at least ``dense_threshold``. A
``dense_threshold`` of null never densifies, under either rule.

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

from dist_share.errors import ConfigError

if TYPE_CHECKING:
    from dist_share.config.schema import StrategyConfig

COMPRESSIONS = {"none": None, "fp16": tf.float16, "bf16": tf.bfloat16}
OPS = ("average", "sum")
DENSE_SWITCHES = ("measured", "static")
BACKENDS = ("none", "tf_distribute", "horovod")
COUNT_DTYPE = tf.float64  # exact for any realistic row count; reduced alike by every backend


@dataclasses.dataclass(frozen=True)
class GradientOptions:
    """How gradients are prepared and reduced (``strategy.sparse`` and ``strategy.horovod``).

    Args:
        dedup: sum rows that share an index before sending.
        dense_threshold: the static rule's density threshold (``dense_switch: static``); None
            never densifies under either rule.
        dense_switch: ``measured`` (agree on the rows really sent, then the cost model) or
            ``static`` (static density bound against ``dense_threshold``).
        compression: ``none | fp16 | bf16`` wire dtype for floats (Horovod only).
        op: Horovod reduction, ``average`` or ``sum``.
        grouped_allreduce: one fused Horovod collective for all dense gradients.
        sparse_as_dense: always send embedding gradients dense.
    """

    dedup: bool = True
    dense_threshold: float | None = 0.5
    dense_switch: str = "measured"
    compression: str = "none"
    op: str = "average"
    grouped_allreduce: bool = True
    sparse_as_dense: bool = False

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                "strategy.horovod.compression",
                f"unknown compression {self.compression!r}; expected one of {sorted(COMPRESSIONS)}",
            )
        if self.op not in OPS:
            raise ConfigError(
                "strategy.horovod.op", f"unknown op {self.op!r}; expected one of {OPS}"
            )
        if self.dense_switch not in DENSE_SWITCHES:
            raise ConfigError(
                "strategy.sparse.dense_switch",
                f"unknown dense switch {self.dense_switch!r}; expected one of {DENSE_SWITCHES}",
            )
        t = self.dense_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
            raise ConfigError(
                "strategy.sparse.dense_threshold", f"must be null or a number >= 0, got {t!r}"
            )

    @classmethod
    def from_config(cls, strategy: StrategyConfig) -> GradientOptions:
        """The options of a validated ``strategy`` section (``sparse`` and ``horovod``)."""
        return cls(
            dedup=strategy.sparse.dedup,
            dense_threshold=strategy.sparse.dense_threshold,
            dense_switch=strategy.sparse.dense_switch,
            compression=strategy.horovod.compression,
            op=strategy.horovod.op,
            grouped_allreduce=strategy.horovod.grouped_allreduce,
            sparse_as_dense=strategy.horovod.sparse_as_dense,
        )


# -- the cost model (plain numbers; also used by benchmarks/scaling_model.py) ---------------------
def ring_allreduce_bytes(payload: float, world_size: int) -> float:
    """Bytes one worker sends (and as many it receives) in a ring all-reduce of `payload`."""
    return 2.0 * (world_size - 1) / world_size * payload if world_size > 1 else 0.0


def allgather_bytes(payload_per_worker: float, world_size: int) -> float:
    """Bytes one worker receives in an all-gather where every worker contributes `payload`."""
    return (world_size - 1) * payload_per_worker if world_size > 1 else 0.0


def dense_wins(total_rows_bytes: Any, table_bytes: Any, world_size: int) -> Any:
    """True where all-reducing the dense table moves fewer bytes than all-gathering the rows.

    Args:
        total_rows_bytes: ``P``, the bytes of the rows all replicas send together (a number or
            a tensor: the decision is taken in the graph from the agreed count).
        table_bytes: ``T``, the bytes of the dense gradient.
        world_size: number of replicas W.

    W >= 2: dense when ``(W-1)/W x P > 2 (W-1)/W x T``, i.e. ``P > 2 T`` (module docstring);
    W = 1: nothing is sent, dense when the dense gradient is the smaller payload (``P > T``).
    """
    factor = 2.0 if world_size > 1 else 1.0
    return total_rows_bytes > factor * table_bytes


# -- preparing one gradient -----------------------------------------------------------------------
def dedup_indexed_slices(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """Sum rows that share an index, so each distinct row is sent once."""
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, grad.dense_shape)


def static_density(grad: tf.IndexedSlices) -> float | None:
    """Upper bound on the fraction of rows touched, from static shapes (None if unknown).

    Static shapes are identical on every replica, so a decision from them needs no agreement;
    it is the fallback rule, and it overestimates badly under skewed ids (65,536 lookups of a
    100,000-row table touch 7.9 % of its rows under Zipf(1.2), not 66 %).
    """
    n = grad.indices.shape[0]
    rows = _static_rows(grad)
    if n is None or rows is None or rows == 0:
        return None
    return min(1.0, n / rows)


def _static_rows(grad: tf.IndexedSlices) -> int | None:
    shape = grad.dense_shape
    shape = tf.get_static_value(shape) if shape is not None else None
    return None if shape is None else int(shape[0])


def _static_densify(grad: tf.IndexedSlices, options: GradientOptions) -> bool:
    density = static_density(grad)
    return (
        options.dense_threshold is not None
        and density is not None
        and density >= options.dense_threshold
    )


def prepare_gradient(grad: Any, options: GradientOptions, allow_sparse: bool = True) -> Any:
    """Densify or dedup one gradient by the *static* rule (dense gradients pass through).

    For a single gradient outside any exchange (tools, benchmarks of the static rule); the
    exchange itself (`reduce_gradients`) decides with the measured rule unless configured not to.
    """
    if not isinstance(grad, tf.IndexedSlices):
        return grad
    if not allow_sparse or options.sparse_as_dense or _static_densify(grad, options):
        return tf.convert_to_tensor(grad)
    return dedup_indexed_slices(grad) if options.dedup else grad


def comm_bytes(grads: Sequence[Any]) -> tf.Tensor:
    """Bytes one replica hands to the collective: values + indices for IndexedSlices, size for dense.

    Static shapes are counted when tracing (a dense model's count is a constant, no ops in the
    step); the others are read at run time, so a tensor with 0 rows (the branch not taken)
    counts 0.
    """
    static = 0
    dynamic = []
    for g in grads:
        if g is None:
            continue
        for t in (g.values, g.indices) if isinstance(g, tf.IndexedSlices) else (g,):
            n = t.shape.num_elements()
            if n is None:
                dynamic.append(tf.size(t, tf.int64) * t.dtype.size)
            else:
                static += n * t.dtype.size
    total = tf.constant(static, tf.int64)
    return tf.add_n([total, *dynamic]) if dynamic else total


def _compress(g: Any, dtype: tf.DType | None) -> Any:
    if dtype is None or g is None:
        return g
    if isinstance(g, tf.IndexedSlices):
        if not g.values.dtype.is_floating:
            return g
        return tf.IndexedSlices(tf.cast(g.values, dtype), g.indices, g.dense_shape)
    return tf.cast(g, dtype) if g.dtype.is_floating else g


def _decompress(g: Any, dtype: tf.DType) -> Any:
    if g is None:
        return g
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(tf.cast(g.values, dtype), g.indices, g.dense_shape)
    return tf.cast(g, dtype)


# -- the exchange ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Switched:
    """A sparse gradient whose form was decided at run time: both collective inputs, one empty.

    ``rows`` are the (deduplicated) rows, or a single zero row when the dense branch is taken;
    ``dense`` is the dense gradient, or a [0, ...] tensor when the sparse branch is taken.
    """

    index: int
    rows: tf.IndexedSlices
    dense: tf.Tensor
    use_dense: tf.Tensor  # scalar bool, identical on every replica


def reduce_gradients(
    grads: Sequence[Any], options: GradientOptions, backend: str, hvd: Any = None
) -> tuple[list[Any], tf.Tensor]:
    """Prepare and all-reduce gradients across replicas; returns (reduced grads, bytes sent).

    Args:
        grads: one gradient (Tensor, IndexedSlices or None) per variable, in replica context.
        options: `GradientOptions`.
        backend: ``none`` (one replica: prepares only, nothing is exchanged);
            ``tf_distribute`` sums with the replica context's all_reduce (the loss was
            divided by the global batch); ``horovod`` uses Horovod collectives with
            `options.op`: 'sum' when the loss was divided by the global batch, 'average' when
            by the per-replica batch.
        hvd: the ``horovod.tensorflow`` module (backend ``horovod``).

    Returns the reduced gradients in the same order and the bytes this replica handed to
    collectives (int64 scalar tensor). A gradient under the measured switch comes back as
    IndexedSlices in both branches (the gathered rows, or every table row with its index), so
    the optimizer sees one type whichever branch ran.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown reduction backend {backend!r}; expected one of {BACKENDS}")
    wire_dtype = COMPRESSIONS[options.compression] if backend == "horovod" else None
    world = _world_size(backend, hvd)
    wire: list[Any] = [None] * len(grads)
    measured: list[tuple[int, tf.IndexedSlices]] = []
    for i, g in enumerate(grads):
        if not isinstance(g, tf.IndexedSlices):
            wire[i] = g
        elif options.sparse_as_dense:
            wire[i] = tf.convert_to_tensor(g)
        elif options.dense_threshold is None:
            wire[i] = dedup_indexed_slices(g) if options.dedup else g
        elif options.dense_switch == "static" or world is None or _table_shape(g) is None:
            wire[i] = prepare_gradient(g, options)  # the static fallback
        else:
            measured.append((i, dedup_indexed_slices(g) if options.dedup else g))
    wire = [_compress(w, wire_dtype) for w in wire]
    nbytes = comm_bytes(wire)
    switched: list[_Switched] = []
    if measured:
        local_rows = [tf.shape(rows.indices)[0] for _, rows in measured]
        total_rows = _agree_on_rows(local_rows, world, backend, hvd)
        if world > 1:
            nbytes += len(measured) * COUNT_DTYPE.size
        for k, (i, rows) in enumerate(measured):
            s = _switch(i, rows, total_rows[k], world, wire_dtype)
            switched.append(s)
            nbytes += comm_bytes([s.rows, s.dense])
    if world is None or world == 1:
        # Nothing to exchange with: one replica's sum is itself.
        reduced = list(wire)
        for s in switched:
            reduced[s.index] = _combine(s.rows, s.dense)
    elif backend == "tf_distribute":
        reduced = _reduce_tf_distribute(wire, switched)
    else:
        reduced = _reduce_horovod(wire, switched, options, hvd)
    out = []
    for r, g in zip(reduced, grads, strict=True):
        out.append(r if wire_dtype is None or g is None else _decompress(r, _dtype_of(g)))
    return out, nbytes


def _dtype_of(g: Any) -> tf.DType:
    return g.values.dtype if isinstance(g, tf.IndexedSlices) else g.dtype


def _world_size(backend: str, hvd: Any) -> int | None:
    """Replicas taking part in the exchange; None when there is no replica context to agree in."""
    if backend == "none":
        return 1
    if backend == "horovod":
        return int(hvd.size())
    ctx = tf.distribute.get_replica_context()
    return None if ctx is None else int(ctx.num_replicas_in_sync)


def _table_shape(g: tf.IndexedSlices) -> list[int] | None:
    """The dense gradient's static shape, or None when any part of it is unknown."""
    shape = tf.get_static_value(g.dense_shape) if g.dense_shape is not None else None
    if shape is None:
        return None
    row = g.values.shape[1:]
    if not row.is_fully_defined():
        return None
    return [int(d) for d in shape]


def _agree_on_rows(local_rows: list[tf.Tensor], world: int, backend: str, hvd: Any) -> tf.Tensor:
    """Sum every replica's row counts with one all-reduce (one float64 per sparse gradient)."""
    counts = tf.cast(tf.stack(local_rows), COUNT_DTYPE)
    if world == 1:
        return counts
    if backend == "horovod":
        return hvd.allreduce(counts, op=hvd.Sum, name="dist_share_sparse_rows")
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, counts)


def _switch(
    index: int, rows: tf.IndexedSlices, total_rows: tf.Tensor, world: int, wire: tf.DType | None
) -> _Switched:
    """Decide dense or sparse for one gradient from the agreed row count; build both inputs."""
    shape = _table_shape(rows)
    assert shape is not None  # checked by the caller
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    vdtype = wire or rows.values.dtype
    row_bytes = row_elems * vdtype.size + rows.indices.dtype.size
    table_bytes = shape[0] * row_elems * vdtype.size
    use_dense = dense_wins(total_rows * row_bytes, float(table_bytes), world)
    inner = shape[1:]

    def dense() -> tf.Tensor:
        return tf.convert_to_tensor(rows)

    def no_dense() -> tf.Tensor:
        return tf.zeros([0, *inner], rows.values.dtype)

    dense_part = tf.cond(use_dense, dense, no_dense)
    # TF 2.21's MirroredStrategy crashes all-gathering IndexedSlices that are empty on every
    # replica, so with W > 1 the dense branch sends one zero row (counted in the bytes).
    pad = 1 if world > 1 else 0
    values = tf.cond(
        use_dense, lambda: tf.zeros([pad, *inner], rows.values.dtype), lambda: rows.values
    )
    indices = tf.cond(use_dense, lambda: tf.zeros([pad], rows.indices.dtype), lambda: rows.indices)
    sparse_part = tf.IndexedSlices(values, indices, rows.dense_shape)
    return _Switched(index, _compress(sparse_part, wire), _compress(dense_part, wire), use_dense)


def _combine(rows: tf.IndexedSlices, dense: tf.Tensor) -> tf.IndexedSlices:
    """One IndexedSlices from the reduced rows and the reduced dense part (one of them empty)."""
    dense_indices = tf.range(tf.shape(dense)[0], dtype=rows.indices.dtype)
    return tf.IndexedSlices(
        tf.concat([rows.values, dense], 0),
        tf.concat([rows.indices, dense_indices], 0),
        rows.dense_shape,
    )


def _reduce_tf_distribute(wire: list[Any], switched: list[_Switched]) -> list[Any]:
    ctx = tf.distribute.get_replica_context()
    items = [g for g in wire if g is not None]
    for s in switched:
        items += [s.rows, s.dense]
    if not items:
        return list(wire)
    summed = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, items))
    out = [None if g is None else next(summed) for g in wire]
    for s in switched:
        rows, dense = next(summed), next(summed)
        out[s.index] = _combine(rows, dense)
    return out


def _reduce_horovod(
    wire: list[Any], switched: list[_Switched], options: GradientOptions, hvd: Any
) -> list[Any]:
    op = hvd.Average if options.op == "average" else hvd.Sum
    out = list(wire)
    dense = [
        (i, g) for i, g in enumerate(wire) if g is not None and not isinstance(g, tf.IndexedSlices)
    ]
    dense += [(("switched", k), s.dense) for k, s in enumerate(switched)]
    reduced_dense: dict[Any, tf.Tensor] = {}
    if dense:
        if options.grouped_allreduce:
            red = hvd.grouped_allreduce([g for _, g in dense], op=op, name="dist_share_grads")
        else:
            red = [
                hvd.allreduce(g, op=op, name=f"dist_share_grad_{n}")
                for n, (_, g) in enumerate(dense)
            ]
        reduced_dense = {key: r for (key, _), r in zip(dense, red, strict=True)}
    for i, g in enumerate(wire):
        if i in reduced_dense:
            out[i] = reduced_dense[i]
        elif isinstance(g, tf.IndexedSlices):
            out[i] = _allgather_rows(g, options, hvd, f"dist_share_sparse_{i}")
    for k, s in enumerate(switched):
        rows = _allgather_rows(s.rows, options, hvd, f"dist_share_switched_{s.index}")
        out[s.index] = _combine(rows, reduced_dense[("switched", k)])
    return out


def _allgather_rows(g: tf.IndexedSlices, options: GradientOptions, hvd: Any, name: str) -> Any:
    values = hvd.allgather(g.values, name=f"{name}_values")
    indices = hvd.allgather(g.indices, name=f"{name}_indices")
    if options.op == "average":
        values = values / tf.cast(hvd.size(), values.dtype)
    return tf.IndexedSlices(values, indices, g.dense_shape)


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
