"""Which examples does each worker read from TFRecord shards? One check covers several shard sets.

Run by train_worker.py inside the shared horovodrun and multi-worker launches
(tests/helpers/train_jobs.py, which writes the shard sets first); tests/data/test_records.py
reads the result.

For every shard directory (its train and eval splits) the worker records the files it reads,
the ids of one training epoch of its pipeline and of one evaluation pass. Under horovodrun the
InputContext comes from the rank (as Horovod jobs build it); under MultiWorkerMirrored the
datasets go through ``distribute_datasets_from_function`` and are iterated as a distributed
dataset.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from dist_share.data.records.source import RecordSource
from dist_share.data.records.writer import write_shards

GLOBAL_TRAIN_BATCH, GLOBAL_EVAL_BATCH = 4, 4


class _CountFallback(logging.Handler):
    """Counts the 'sharding by example' warnings (each source must say it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "sharding by example" in record.getMessage():
            self.n += 1


def check(
    shard_dirs: Sequence[str], hvd: Any = None, strategy: tf.distribute.Strategy | None = None
) -> dict:
    """Horovod (`hvd` given) or MultiWorkerMirrored (`strategy` given): what this worker reads."""
    if hvd is not None:
        rank, size = hvd.rank(), hvd.size()
        ctx = tf.distribute.InputContext(
            num_input_pipelines=size, input_pipeline_id=rank, num_replicas_in_sync=size
        )

        def read(fn: Callable, steps: int | None = None) -> list[int]:
            ds = fn(ctx)
            return [int(i) for f, _ in (ds.take(steps) if steps else ds) for i in f["id"].numpy()]

    else:
        assert strategy is not None
        rank, size = strategy.cluster_resolver.task_id, strategy.num_replicas_in_sync
        ctx = tf.distribute.InputContext(size, rank, size)

        def read(fn: Callable, steps: int | None = None) -> list[int]:
            ids = []
            iterator = iter(strategy.distribute_datasets_from_function(fn))
            step = 0
            while steps is None or step < steps:
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                for on_replica in strategy.experimental_local_results(batch.get_value()[0]["id"]):
                    ids += [int(i) for i in on_replica.numpy()]
                step += 1
            return ids

    counter = _CountFallback()
    logger = logging.getLogger("dist_share.data.records")
    logger.addHandler(counter)
    try:
        result: dict = {}
        for directory in shard_dirs:
            train = RecordSource.open(directory, split="train")
            evals = RecordSource.open(directory, split="eval")
            plan = train.plan(ctx)
            per_replica = ctx.get_per_replica_batch_size(GLOBAL_TRAIN_BATCH)
            # Synchronous steps: every worker takes as many as the longest epoch needs.
            longest = max(
                train.plan(tf.distribute.InputContext(size, r, size)).epoch_examples
                for r in range(size)
            )
            steps = math.ceil(longest / per_replica)
            ids = read(train.dataset_fn(GLOBAL_TRAIN_BATCH, training=True, seed=11), steps)
            files = [[train.shards[f].first_example, train.shards[f].examples] for f in plan.files]
            result[os.path.basename(directory).lstrip("s")] = {
                "by_example": plan.by_example,
                "files": [] if plan.by_example else files,
                "train_epoch_ids": ids[: plan.epoch_examples],
                "eval_ids": read(evals.dataset_fn(GLOBAL_EVAL_BATCH, training=False)),
            }
    finally:
        logger.removeHandler(counter)
    result["fallback_logged"] = counter.n
    return result


def write_shard_sets(root: str) -> list[str]:
    """99 train examples as 4 shards (by file: 50 | 49 per worker) and as 3 (33 * 3 splits
    unevenly over 2 workers: by example), and 41 eval examples the same ways (21 | 20: one
    worker has one more eval batch). Example i has id i (train_common.id_split)."""
    from tests.workers.train_common import id_split

    dirs = []
    for shards in (4, 3):
        directory = os.path.join(root, f"s{shards}")
        write_shards(
            directory, {"train": id_split(99), "eval": id_split(41, seed=1)},
            {"train": shards, "eval": shards}, family="siamese", progress=False,
        )  # fmt: skip
        dirs.append(directory)
    return dirs
