"""What went wrong while streaming shards: a TensorFlow error turned into a DataError that names
the file, the record and the stream."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dist_share.data.records.codec import (
    LABEL_KEY,
    SHAPE_SUFFIX,
    check_example,
    shape_check_failure,
)
from dist_share.data.records.manifest import Manifest
from dist_share.data.records.reader import read_record
from dist_share.errors import DataError


def explain(error: BaseException, files: Sequence[str], manifest: Manifest) -> DataError | None:
    """The DataError behind a TensorFlow error raised while streaming `files`, or None.

    Parser errors carry ``file:record`` and the stream; a shape mismatch carries the message of
    the in-graph check (:func:`~dist_share.data.records.codec.parse_fn`); a corrupted or
    truncated record (DataLossError, which names no file) is located by reading the files one by
    one.
    """
    import tensorflow as tf

    text = str(error)
    failed = shape_check_failure(text)
    if failed:
        file, key, record, found = failed
        name, spec = list({**manifest.streams, LABEL_KEY: manifest.label}.items())[key]
        what = "the label" if name == LABEL_KEY else f"stream {name!r}"
        return DataError(
            f"{files[file]}, record {record}: {what}: expected shape "
            f"{list(spec.shape)}, found {found}"
        )
    m = re.search(r"Name: (.+?):(\d+), (?:Key|Feature): ([^, ]+)[ ,](.*?)(?:\n|\[\[|$)", text)
    if m:
        path, record, key, detail = m.group(1), m.group(2), m.group(3), m.group(4)
        # The record itself says best what is wrong with it; TF's words are the fallback.
        try:
            payload = read_record(path, manifest.compression, int(record))
            if payload is not None:
                check_example(payload, manifest, f"{path}, record {record}")
        except DataError as precise:
            return precise
        except (OSError, tf.errors.OpError):
            pass
        return DataError(_describe_parse_error(manifest, path, record, key, detail))
    if isinstance(error, tf.errors.DataLossError):
        bad = find_unreadable_file(files, manifest.compression)
        if bad is not None:
            return DataError(f"{bad[0]}: {bad[1]}: the file is damaged; convert the data again")
        what = re.search(r"(corrupted|truncated) record at \d+", text)
        return DataError(
            f"one of the {len(files)} shard files is damaged "
            f"({what.group(0) if what else text.splitlines()[0]}); convert the data again"
        )
    return None


def _describe_parse_error(manifest: Manifest, path: str, record: str, key: str, detail: str) -> str:
    streams = {**manifest.streams, LABEL_KEY: manifest.label}
    base = key[: -len(SHAPE_SUFFIX)] if key.endswith(SHAPE_SUFFIX) else key
    spec = streams.get(base)
    what = "the label" if base == LABEL_KEY else f"stream {base!r}"
    where = f"{path}, record {record}: {what}"
    if spec is None:
        return f"{where}: {detail.strip()}"
    if "could not be found" in detail:
        if key.endswith(SHAPE_SUFFIX):
            return f"{where}: the record has no {key!r} (its shape)"
        return f"{where} is missing"
    found = re.search(r"Values size: (\d+)", detail)
    if found and key.endswith(SHAPE_SUFFIX):
        return (
            f"{where}: expected shape {list(spec.shape)} (rank {len(spec.shape)}), found a "
            f"shape of rank {found.group(1)}"
        )
    if found:
        return (
            f"{where}: expected shape {list(spec.shape)} ({spec.size} values), "
            f"found {found.group(1)} values"
        )
    types = re.search(r"Data type: (\w+) but expected type: (\w+)", detail) or re.search(
        r"Expected type: (\w+), Actual type: (\w+)", detail
    )
    if types:
        return f"{where}: expected {spec.dtype} values ({spec.kind}), found another type: {detail.strip()}"
    return f"{where}: {detail.strip()}"


def find_unreadable_file(files: Sequence[str], compression: str) -> tuple[str, str] | None:
    """The first of `files` TensorFlow cannot stream to the end (and why), or None."""
    import tensorflow as tf

    for path in files:
        ds = tf.data.TFRecordDataset(path, compression_type=compression)
        try:
            ds.reduce(np.int64(0), lambda n, _: n + 1)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            first = str(e).split("[Op:")[0].split("}}")[-1].strip()
            return path, first
    return None
