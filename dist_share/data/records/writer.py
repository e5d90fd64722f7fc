"""Writing a data set as TFRecord shards plus their manifest, each file atomically."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dist_share.data.records.codec import LABEL_KEY, SHAPE_SUFFIX, example_encoder
from dist_share.data.records.manifest import (
    COMPRESSIONS,
    MANIFEST_NAME,
    FeatureSpec,
    Manifest,
    ShardInfo,
    describe_streams,
)
from dist_share.data.types import Arrays
from dist_share.errors import DataError
from dist_share.files import atomic_write, atomic_write_text, fsync_dir


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00002-of-00004.tfrecord``: the split, the shard and how many shards there are."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def _spec_of(name: str, array: np.ndarray, what: str) -> FeatureSpec:
    try:
        return FeatureSpec(array.shape[1:], array.dtype)
    except DataError as e:
        raise DataError(f"{what} {name!r}: {e}") from None


def _check_arrays(splits: Mapping[str, Arrays]) -> tuple[dict[str, FeatureSpec], FeatureSpec]:
    """The streams' and label's specs, the same for every split; lengths must agree."""
    streams: dict[str, FeatureSpec] | None = None
    label: FeatureSpec | None = None
    for split, (features, labels) in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_.]+", split):
            raise DataError(f"split name {split!r}: use letters, digits, '_' and '.' only")
        if not features:
            raise DataError(f"split {split!r} has no streams")
        labels = np.asarray(labels)
        these = {}
        for name, a in features.items():
            if name == LABEL_KEY or name.endswith(SHAPE_SUFFIX):
                raise DataError(
                    f"stream name {name!r} is reserved ({LABEL_KEY!r} and '*{SHAPE_SUFFIX}' "
                    "are record features of their own)"
                )
            a = np.asarray(a)
            if a.ndim == 0 or len(a) != len(labels):
                raise DataError(
                    f"split {split!r}: stream {name!r} has {len(a) if a.ndim else 0} examples "
                    f"but the labels have {len(labels)}"
                )
            these[name] = _spec_of(name, a, f"split {split!r}: stream")
        this_label = _spec_of(LABEL_KEY, labels, f"split {split!r}:")
        if streams is None:
            streams, label = these, this_label
        elif these != streams or this_label != label:
            raise DataError(
                f"split {split!r} holds {describe_streams(these, this_label)} but the first split "
                f"holds {describe_streams(streams, label)}; every split must have the same streams"
            )
    if streams is None or label is None:
        raise DataError("nothing to write: no splits given")
    return streams, label


def _to_lists(array: np.ndarray, spec: FeatureSpec) -> list:
    """Rows of `array` as flat Python lists of floats or ints (one bulk conversion, fast)."""
    flat = array.reshape(len(array), -1)
    flat = flat.astype(np.float32 if spec.kind == "float_list" else np.int64, copy=False)
    return flat.tolist()


class _Progress:
    """A Keras progress bar on a terminal; otherwise one plain line per written shard."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.tty = sys.stdout.isatty() if enabled is None else enabled
        self.enabled = enabled is not False
        self.total = total
        self.done = 0
        self.bar = None
        if self.enabled and self.tty and total:
            import keras

            self.bar = keras.utils.Progbar(total, unit_name="example")

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.done)

    def shard_done(self, path: Path, examples: int, size: int) -> None:
        if self.enabled and self.bar is None:
            print(
                f"wrote {path} ({examples} examples, {size / 1e6:.1f} MB; "
                f"{self.done}/{self.total} examples)",
                flush=True,
            )


def write_shards(
    directory: str | os.PathLike,
    splits: Mapping[str, Arrays],
    num_shards: int | Mapping[str, int],
    *,
    family: str | None = None,
    source: Mapping[str, Any] | None = None,
    compression: str = "",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Write every split as ``num_shards`` TFRecord files plus ``manifest.json`` in `directory`.

    Shard ``i`` of a split holds the contiguous examples ``[first_example, first_example +
    examples)`` in source order (``np.array_split`` sizes: they differ by at most one).

    Args:
        directory: a local directory (created if missing).
        splits: ``{split: ({stream: array [n, ...]}, labels [n])}``; every split has the same
            streams with the same per-example shapes and dtypes.
        num_shards: shards per split (one number for all splits, or per split).
        family: the model family the data is for (recorded in the manifest, checked by readers
            that know their family).
        source: a description of where the data came from (recorded as is).
        compression: ``""`` or ``"GZIP"``.
        overwrite: replace a data set already converted into `directory` (its shards that the
            new manifest does not list are removed after the new manifest is in place).
        progress: a progress bar (None: on a terminal only; plain lines otherwise).

    Returns:
        The written manifest.

    Raises:
        DataError: inconsistent arrays, an unsupported dtype, more shards than examples, or
            `directory` already holds a converted data set and `overwrite` is false.
    """
    import tensorflow as tf

    if compression not in COMPRESSIONS:
        raise DataError(f"compression is {compression!r}, expected one of {COMPRESSIONS}")
    streams, label = _check_arrays(splits)
    counts = {s: num_shards if isinstance(num_shards, int) else num_shards[s] for s in splits}
    for split, (_, labels) in splits.items():
        n = len(labels)
        if not 1 <= counts[split] <= max(n, 1):
            raise DataError(
                f"split {split!r}: {counts[split]} shards for {n} examples "
                "(expected 1 <= shards <= examples)"
            )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    old: Manifest | None = None
    if manifest_path.exists():
        if not overwrite:
            raise DataError(
                f"{out} already holds a converted data set ({manifest_path}); "
                "choose another directory or overwrite it"
            )
        with contextlib.suppress(DataError):
            old = Manifest.load(manifest_path)

    encode = example_encoder(streams, label)
    options = tf.io.TFRecordOptions(compression_type=compression or None)
    bar = _Progress(sum(len(lab) for _, lab in splits.values()), progress)
    shards: list[ShardInfo] = []
    chunk = 4096  # examples converted to Python lists at a time: bounded extra memory
    for split, (features, labels) in splits.items():
        labels = np.asarray(labels)
        bounds = np.cumsum(
            [0] + [len(p) for p in np.array_split(np.arange(len(labels)), counts[split])]
        )
        for i in range(counts[split]):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            final = out / shard_name(split, i, counts[split])

            def write(
                tmp: Path, lo: int = lo, hi: int = hi, features=features, labels=labels
            ) -> None:
                with tf.io.TFRecordWriter(str(tmp), options) as writer:
                    for c in range(lo, hi, chunk):
                        end = min(c + chunk, hi)
                        rows = {
                            k: _to_lists(np.asarray(v[c:end]), streams[k])
                            for k, v in features.items()
                        }
                        labs = _to_lists(labels[c:end], label)
                        for j in range(end - c):
                            writer.write(encode({k: r[j] for k, r in rows.items()}, labs[j]))
                        bar.add(end - c)

            atomic_write(final, write)
            size = final.stat().st_size
            shards.append(ShardInfo(final.name, split, hi - lo, size, lo))
            bar.shard_done(final, hi - lo, size)
    manifest = Manifest(
        streams=streams,
        label=label,
        shards=tuple(shards),
        family=family,
        compression=compression,
        source=dict(source or {}),
        path=manifest_path,
    )

    atomic_write_text(manifest_path, json.dumps(manifest.to_json(), indent=2) + "\n")
    if old is not None:
        keep = {s.file for s in shards}
        for s in old.shards:
            if s.file not in keep:
                with contextlib.suppress(FileNotFoundError):
                    (out / s.file).unlink()
    fsync_dir(out)
    return manifest
