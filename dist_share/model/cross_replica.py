"""The replicas that share a step, as a batch-coupled layer, loss or metric sees them.

A loss that compares rows (in-batch negatives), a batch normalisation or a batch metric must
see the *global* batch to give the same result however the batch is split across replicas and
processes. `current_group` returns the group of replicas computing the present step; its
`ReplicaGroup.gather_rows` and `ReplicaGroup.all_sum` are exact and differentiable: the gradient
of a row flows back to the replica that made it, summed over every replica whose result used it
(docs/DISTRIBUTED.md, "What is exact across replicas").

Which group applies is found, not passed: inside a tf.distribute replica function it is that
strategy's replicas; in a Horovod job it is every process (`set_process_group`, called by the
Horovod strategy); otherwise one replica, for which both operations are the identity.
`local_only` makes code inside it see its own replica's rows only (``negatives: local``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from dist_share.model.trace_flags import TraceFlag

_local = TraceFlag()
_compiled = TraceFlag()
_process_group: ReplicaGroup | None = None
_waits = threading.local()  # per replica thread, like TraceFlag


class CollectiveInCompiledPass(Exception):
    """A collective was traced inside a pass XLA compiles (`compiled_pass`): it must stay
    outside (a tf.distribute collective cannot be nested in a compiled function, and XLA
    cannot compile Horovod's)."""


class ReplicaGroup:
    """One replica: gathering and summing are the identity. Subclasses talk to the others."""

    num_replicas: int = 1

    def gather_rows(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(every replica's ``x`` concatenated along axis 0 in replica order, where this
        replica's first row sits in it). Replicas may hold different numbers of rows."""
        return x, tf.constant(0, tf.int32)

    def all_sum(self, x: tf.Tensor) -> tf.Tensor:
        """The elementwise sum of ``x`` over the replicas."""
        return x

    def gather_values(self, x: tf.Tensor) -> tf.Tensor:
        """Every replica's ``x`` concatenated along axis 0, in the order of `gather_rows`,
        without a gradient (labels and ids, of any dtype)."""
        return x


class CollectiveGroup(ReplicaGroup):
    """A group whose gather and sum carry their exact gradients (sum over replicas).

    Subclasses give the raw collectives; the gradients are defined here once, because the
    built-in gradients differ between backends (tf.distribute sums, Horovod's allgather
    averages) and neither knows the row offset of a replica whose batch size differs.
    A gather costs two collectives (the row counts, then the rows) and its gradient one (a sum).
    """

    def _gather(self, x: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _sum(self, x: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def _index(self) -> tf.Tensor:
        raise NotImplementedError

    def _timed(self, collective: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """``collective(x)``; inside `collective_waits`, also how long this replica spent in it."""
        if _compiled.on:
            raise CollectiveInCompiledPass(
                f"the pass exchanges rows with the other {self.num_replicas - 1} replica(s) "
                "(a batch-coupled loss, normalisation or metric)"
            )
        log = getattr(_waits, "log", None)
        if log is None:
            return collective(x)
        with tf.control_dependencies([x]):
            arrived = tf.timestamp()
        y = collective(x)
        with tf.control_dependencies([y]):
            log.append(tf.timestamp() - arrived)
        return y

    def gather_rows(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rows = tf.shape(x)[0]
        counts = self._timed(self._gather, tf.reshape(rows, [1]))
        start = tf.reduce_sum(counts[: self._index()])
        group = self

        @tf.custom_gradient
        def gather(value: tf.Tensor) -> Any:
            def grad(upstream: tf.Tensor) -> tf.Tensor:
                return group._timed(group._sum, upstream)[start : start + rows]

            return group._timed(group._gather, value), grad

        return gather(x), start

    def gather_values(self, x: tf.Tensor) -> tf.Tensor:
        return self._timed(self._gather, tf.stop_gradient(x))

    def all_sum(self, x: tf.Tensor) -> tf.Tensor:
        group = self

        @tf.custom_gradient
        def total(value: tf.Tensor) -> Any:
            return group._timed(group._sum, value), lambda up: group._timed(group._sum, up)

        return total(x)


class TFDistributeGroup(CollectiveGroup):
    """The replicas of a tf.distribute strategy (MirroredStrategy, MultiWorkerMirrored)."""

    def __init__(self, context: tf.distribute.ReplicaContext) -> None:
        self.context = context
        self.num_replicas = int(context.num_replicas_in_sync)

    def _gather(self, x: tf.Tensor) -> tf.Tensor:
        return self.context.all_gather(x, axis=0)

    def _sum(self, x: tf.Tensor) -> tf.Tensor:
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, x)

    def _index(self) -> tf.Tensor:
        return tf.cast(self.context.replica_id_in_sync_group, tf.int32)


def set_process_group(group: ReplicaGroup | None) -> None:
    """Make ``group`` the replicas of this process's job outside tf.distribute (Horovod)."""
    global _process_group
    _process_group = group


@contextlib.contextmanager
def collective_waits(enabled: bool = True) -> Iterator[list[tf.Tensor]]:
    """Inside (while a replica's step is traced), every collective of a group records the
    seconds this replica spent in it, from its input being ready to the result (float64
    tensors, in the yielded list). Off (``enabled=False``) the list stays empty: reading the
    clock is an op that op determinism forbids."""
    outer = getattr(_waits, "log", None)
    log: list[tf.Tensor] = []
    _waits.log = log if enabled else None
    try:
        yield log
    finally:
        _waits.log = outer


def compiled_pass() -> contextlib.AbstractContextManager[None]:
    """Inside, a collective of a group of several replicas raises `CollectiveInCompiledPass`."""
    return _compiled.set()


def local_only() -> contextlib.AbstractContextManager[None]:
    """Inside, `current_group` is this replica alone (per-replica negatives, for comparison)."""
    return _local.set()


def current_group() -> ReplicaGroup:
    """The replicas computing the present step (one, outside any distribution)."""
    if _local.on:
        return ReplicaGroup()
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return TFDistributeGroup(context)
    if _process_group is not None and _process_group.num_replicas > 1:
        return _process_group
    return ReplicaGroup()
