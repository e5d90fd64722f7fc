"""tf.distribute smoke worker: an all-reduce across replicas under Mirrored or MultiWorkerMirrored.

argv: mirrored|multiworker OUT_DIR
"""

import json
import os
import sys

import tensorflow as tf

kind, out_dir = sys.argv[1], sys.argv[2]
if kind == "mirrored":
    # Two logical CPU devices stand in for two GPUs; this must happen before TF touches devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")]
    )
    task_index = 0
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task_index = strategy.cluster_resolver.task_id


@tf.function
def replica_fn():
    ctx = tf.distribute.get_replica_context()
    # Replica i of worker w contributes (global replica id + 1); the sum is known in advance.
    value = tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


per_replica = strategy.run(replica_fn)
values = [float(v.numpy()) for v in strategy.experimental_local_results(per_replica)]
with open(os.path.join(out_dir, f"{kind}{task_index}.json"), "w") as f:
    json.dump({"replicas": strategy.num_replicas_in_sync, "values": values}, f)
