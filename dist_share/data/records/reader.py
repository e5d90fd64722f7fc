"""Reading shard files: record by record in Python, and as one input pipeline's tf.data stream."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf


def iter_records(path: str, compression: str = "") -> Iterator[bytes]:
    """The payloads of a TFRecord file in order, read with plain Python I/O (no TensorFlow graph).

    Used by the open-time checks and to look at one record named in an error. The CRCs are not
    checked here; TensorFlow checks them when the pipeline streams the file.

    Raises:
        DataError: the file ends inside a record (truncated).
    """
    from tensorflow.io import gfile

    with gfile.GFile(path, "rb") as raw:
        f: Any = gzip.GzipFile(fileobj=raw) if compression == "GZIP" else raw
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise DataError(f"{path}: truncated: the header of record {index} is incomplete")
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) < length or len(f.read(4)) < 4:
                raise DataError(
                    f"{path}: truncated: record {index} should hold {length} bytes, "
                    f"the file ends before it does"
                )
            yield payload
            index += 1


def read_record(path: str, compression: str, index: int) -> bytes | None:
    """Record `index` of a TFRecord file (None: the file holds fewer records)."""
    for i, payload in enumerate(iter_records(path, compression)):
        if i == index:
            return payload
    return None


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """What one input pipeline reads: file indices into the source's files, and how."""

    files: tuple[int, ...]
    by_example: bool  # True: every pipeline reads all files and keeps every n-th record
    num_pipelines: int
    pipeline_id: int
    epoch_examples: int  # records this pipeline yields per epoch


def serialized_records(
    files: Sequence[str],
    compression: str,
    plan: PipelinePlan,
    epoch: tf.Tensor | None,
    seed: int,
    shuffle_buffer: int,
    cycle_length: int,
) -> tf.data.Dataset:
    """One pass of `plan` over `files`: (file index, record index, serialized record).

    Shuffled when `epoch` is given (the file order and the record buffer drawn from `seed`,
    `epoch` and the pipeline); in file order otherwise.
    """
    import tensorflow as tf

    paths = tf.constant(files)
    order = tf.constant(plan.files, tf.int32)
    if epoch is not None and len(plan.files) > 1:
        # The file order of this epoch: stateless, so every process computes the same one
        # (by-example sharding relies on that) whatever TensorFlow's global seed is.
        keys = tf.random.stateless_uniform([len(plan.files)], seed=tf.stack([seed, epoch]))
        order = tf.gather(order, tf.argsort(keys))

    def read(f: tf.Tensor) -> tf.data.Dataset:
        ds = tf.data.TFRecordDataset(
            tf.gather(paths, f), compression_type=compression, buffer_size=1 << 20
        )
        # zip, not enumerate().map(): no Python-traced function runs per record.
        index = tf.data.Dataset.from_tensors(f).repeat()
        return tf.data.Dataset.zip((index, tf.data.Dataset.range(2**62), ds))

    cycle = max(1, min(cycle_length, len(plan.files)))
    parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=cycle, block_length=1, **(parallel if cycle > 1 else {})
    )
    if plan.by_example and plan.num_pipelines > 1:
        ds = ds.shard(plan.num_pipelines, plan.pipeline_id)
    if epoch is not None and shuffle_buffer > 1:
        # The seed is a tensor (it depends on the epoch). tf.data combines it with the graph
        # seed and, when that is 0 (tf.random.set_seed(0), as the trainer does with
        # training.seed 0), compares the tensor with 0 in Python and fails. A graph seed of
        # our own, set inside this traced function only, keeps the order independent of
        # the user's global seed as well.
        if not tf.executing_eagerly():  # traced: this sets the function graph's seed only
            tf.random.set_seed(seed % 1_000_003 + 1)
        ds = ds.shuffle(
            min(shuffle_buffer, max(plan.epoch_examples, 1)),
            seed=(tf.cast(epoch, tf.int64) * 1_000_003 + seed) * 1009 + plan.pipeline_id,
            reshuffle_each_iteration=False,
        )
    return ds
