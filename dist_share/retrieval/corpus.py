"""A corpus cut into parts, one embedding shard each: slices of in-memory rows, or TFRecord shards."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dist_share.data.records.codec import parse_fn
from dist_share.data.records.source import RecordSource

Batch = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows of a corpus (``count`` of them, the first with id ``first_id``); ``batches(size)``
    yields ``(features, ids, classes)`` NumPy batches of them in id order (classes: -1 where
    unknown)."""

    index: int
    count: int
    first_id: int
    batches: Callable[[int], Iterator[Batch]]


def _from_rows(features: Mapping[str, np.ndarray], ids: np.ndarray, classes: np.ndarray):
    def batches(size: int) -> Iterator[Batch]:
        # Slices of the arrays: no per-row work (a tf.data slice-then-batch would be).
        for start in range(0, len(ids), size):
            end = start + size
            yield {k: v[start:end] for k, v in features.items()}, ids[start:end], classes[start:end]

    return batches


def array_parts(
    features: Mapping[str, np.ndarray],
    ids: np.ndarray,
    classes: np.ndarray | None,
    part_size: int,
) -> list[Part]:
    """In-memory rows (ids ascending) in parts of ``part_size`` rows."""
    n = len(ids)
    classes = np.full(n, -1, np.int64) if classes is None else np.asarray(classes, np.int64)
    parts = []
    for index, start in enumerate(range(0, n, part_size)):
        end = min(n, start + part_size)
        rows = {k: v[start:end] for k, v in features.items()}
        batches = _from_rows(rows, ids[start:end], classes[start:end])
        parts.append(Part(index, end - start, int(ids[start]), batches))
    return parts


def record_parts(source: RecordSource, streams: Sequence[str], with_classes: bool) -> list[Part]:
    """One part per TFRecord shard; a record's id is its row in the split it was converted
    from (the manifest's ``first_example`` of its shard plus its index in the shard)."""
    parse = parse_fn(source.files, source.manifest)
    compression = source.manifest.compression
    parts = []
    for index, (path, info) in enumerate(zip(source.files, source.shards, strict=True)):
        first = info.first_example

        def batches(
            size: int, index: int = index, path: str = path, first: int = first
        ) -> Iterator[Batch]:
            records = tf.data.TFRecordDataset(path, compression_type=compression)
            numbered = tf.data.Dataset.zip(
                (
                    tf.data.Dataset.from_tensors(index).repeat(),
                    tf.data.Dataset.range(2**62),
                    records,
                )
            ).batch(size)

            def pick(file_ids: tf.Tensor, positions: tf.Tensor, serialized: tf.Tensor) -> Any:
                features, labels = parse(file_ids, positions, serialized)
                classes = tf.cast(labels, tf.int64) if with_classes else -tf.ones_like(positions)
                return {s: features[s] for s in streams}, positions + first, classes

            return numbered.map(pick).prefetch(2).as_numpy_iterator()

        parts.append(Part(index, info.examples, first, batches))
    return parts
