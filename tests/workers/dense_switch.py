"""The measured dense switch with *different* rows per replica, mirrored x2 or Horovod.

Every replica builds the gradient of a shared [ROWS, DIM] table from its own ids (the cases
below give the replicas different numbers of distinct ids, so a per-replica decision would
differ), reduces it together with a dense gradient through `gradients.reduce_gradients` inside
a tf.function, and records, per case and replica: the reduced table gradient (densified), the
reduced dense gradient and the bytes it handed to collectives. The test derives the branch from
the bytes and checks the sums. Run by train_worker.py inside the shared mirrored (2 logical
CPUs) and horovodrun launches (tests/helpers/train_jobs.py): logical devices and Horovod must be
set up before TensorFlow starts, which those launches do; tests/distribute/test_gradients.py
reads the result.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

ROWS, DIM = 40, 4
# case -> ids of replica 0, ids of replica 1 (with repeats: dedup must sum them).
CASES = {
    # 3 + 2 distinct rows: 5 x 20 B = 100 B of rows vs a 640 B table: sparse everywhere.
    "sparse": ([1, 1, 2, 3, 3, 3], [3, 5, 5]),
    # replica 0 alone touches 30 of 40 rows (75 % > a 50 % local threshold) but together the
    # replicas send 31 rows = 620 B <= 2 x 640 B: sparse everywhere.
    "skewed": (list(range(30)) + [0, 1], [7]),
    # 40 + 30 rows = 1400 B > 1280 B: dense everywhere, although replica 1 alone would not.
    "dense": (list(range(40)), list(range(5, 35))),
}


def ids_for(case: str, replica: int) -> list[int]:
    return CASES[case][replica]


def check(hvd: Any = None, strategy: tf.distribute.Strategy | None = None) -> dict:
    """Horovod (`hvd` given: this rank's replica) or MirroredStrategy over 2 devices (`strategy`
    given: both replicas). Returns {replica: {case[/variant]: record}}."""
    from dist_share.distribute import gradients as G

    backend = "horovod" if hvd is not None else "tf_distribute"
    # Horovod also runs the cases with fp16 on the wire and op=average (each under its own key).
    variants = {"": G.GradientOptions(op="sum")}
    if hvd is not None:
        variants["/fp16_average"] = G.GradientOptions(op="average", compression="fp16")

    def replica_fn(
        ids: tf.Tensor, scale: tf.Tensor, options: G.GradientOptions
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        table_grad = tf.IndexedSlices(
            tf.ones([tf.shape(ids)[0], DIM]) * scale, ids, tf.constant([ROWS, DIM])
        )
        dense_grad = tf.fill([3, 2], scale)
        (table, dense), nbytes = G.reduce_gradients([table_grad, dense_grad], options, backend, hvd)
        return tf.convert_to_tensor(table), dense, nbytes

    results: dict[str, dict] = {}
    if hvd is None:
        assert strategy is not None and strategy.num_replicas_in_sync == 2
        options = variants[""]
        step = tf.function(lambda ids, scale: strategy.run(replica_fn, (ids, scale, options)))
        for case in CASES:
            ids = strategy.experimental_distribute_values_from_function(
                lambda ctx, c=case: tf.constant(ids_for(c, ctx.replica_id_in_sync_group), tf.int32)
            )
            scale = strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(float(ctx.replica_id_in_sync_group + 1))
            )
            outs = [strategy.experimental_local_results(o) for o in step(ids, scale)]
            for r in range(2):
                results.setdefault(str(r), {})[case] = _record(*(o[r] for o in outs))
    else:
        rank = hvd.rank()
        results[str(rank)] = {}
        for suffix, options in variants.items():
            step = tf.function(lambda ids, scale, o=options: replica_fn(ids, scale, o))
            for case in CASES:
                ids = tf.constant(ids_for(case, rank), tf.int32)
                results[str(rank)][case + suffix] = _record(
                    *step(ids, tf.constant(float(rank + 1)))
                )
    return results


def _record(table: tf.Tensor, dense: tf.Tensor, nbytes: tf.Tensor) -> dict:
    return {
        "table": tf.cast(table, tf.float32).numpy().tolist(),
        "dense": dense.numpy().tolist(),
        "bytes": int(nbytes.numpy()),
    }
