"""Which examples does each worker read from TFRecord shards? One launch checks several shard sets.

argv: horovod|multiworker OUT_DIR SHARD_DIR...

For every shard directory (its train and eval splits) the worker records the files it reads,
the ids of one training epoch of its pipeline and of one evaluation pass, and writes
OUT_DIR/worker<rank>.json. Under horovodrun the InputContext comes from the rank (as Horovod
jobs build it); under MultiWorkerMirrored the datasets go through
``distribute_datasets_from_function`` and are iterated as a distributed dataset.
"""

import json
import logging
import math
import os
import sys

import tensorflow as tf

from dist_share import records

kind, out_dir, shard_dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
GLOBAL_TRAIN_BATCH, GLOBAL_EVAL_BATCH = 4, 4


class Count(logging.Handler):
    n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "sharding by example" in record.getMessage():
            Count.n += 1


logging.getLogger("dist_share.records").addHandler(Count())

if kind == "horovod":
    import horovod.tensorflow as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    ctx = tf.distribute.InputContext(
        num_input_pipelines=size, input_pipeline_id=rank, num_replicas_in_sync=size
    )

    def read(fn, steps=None):
        ds = fn(ctx)
        return [int(i) for f, _ in (ds.take(steps) if steps else ds) for i in f["id"].numpy()]

else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank, size = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync
    ctx = tf.distribute.InputContext(size, rank, size)

    def read(fn, steps=None):
        ids = []
        iterator = iter(strategy.distribute_datasets_from_function(fn))
        step = 0
        while steps is None or step < steps:
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                break
            for ids_on_replica in strategy.experimental_local_results(batch.get_value()[0]["id"]):
                ids += [int(i) for i in ids_on_replica.numpy()]
            step += 1
        return ids


result = {}
for directory in shard_dirs:
    train = records.RecordSource.open(directory, split="train")
    evals = records.RecordSource.open(directory, split="eval")
    plan = train.plan(ctx)
    per_replica = ctx.get_per_replica_batch_size(GLOBAL_TRAIN_BATCH)
    # Synchronous steps: every worker takes as many as the longest epoch needs.
    longest = max(
        train.plan(tf.distribute.InputContext(size, r, size)).epoch_examples for r in range(size)
    )
    steps = math.ceil(longest / per_replica)
    ids = read(train.dataset_fn(GLOBAL_TRAIN_BATCH, training=True, seed=11), steps)
    result[os.path.basename(directory).lstrip("s")] = {
        "by_example": plan.by_example,
        "files": [[train.shards[f].first_example, train.shards[f].examples] for f in plan.files]
        if not plan.by_example
        else [],
        "train_epoch_ids": ids[: plan.epoch_examples],
        "eval_ids": read(evals.dataset_fn(GLOBAL_EVAL_BATCH, training=False)),
    }
result["fallback_logged"] = Count.n
with open(os.path.join(out_dir, f"worker{rank}.json"), "w") as f:
    json.dump(result, f)
