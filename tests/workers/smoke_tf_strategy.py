"""tf.distribute smoke check: an all-reduce across replicas under Mirrored or MultiWorkerMirrored.

Run by train_worker.py inside the shared mirrored and multi-worker launches
(tests/helpers/train_jobs.py) on the tf.distribute strategy the launch built;
tests/integration/test_smoke.py reads the result.
"""

from __future__ import annotations

import tensorflow as tf


def check(strategy: tf.distribute.Strategy) -> dict:
    """Replica i contributes its global replica id + 1: the sum is known in advance."""

    @tf.function
    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        value = tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)

    per_replica = strategy.run(replica_fn)
    values = [float(v.numpy()) for v in strategy.experimental_local_results(per_replica)]
    return {"replicas": strategy.num_replicas_in_sync, "values": values}
