"""TFRecord shards: write a data set as N files of ``tf.train.Example`` plus a manifest, stream it back.

The in-memory sources (data.py) hold every example in every process. This module is the source
for data that does not fit: examples live in sharded TFRecord files and each input pipeline
streams only its part of them through ``tf.data`` (interleave over files, a shuffle buffer,
batched parsing, prefetch, all AUTOTUNEd); nothing is ever materialised whole.

Record format (one ``tf.train.Example`` per example):

* every stream is one feature holding its values flattened in C order: a ``float_list`` for
  floating dtypes, an ``int64_list`` for integer and bool dtypes;
* every non-scalar stream also carries its shape as ``<stream>/shape`` (an ``int64_list``), so a
  record says what it holds and a reader can tell a [4, 4, 4] tensor from an [8, 8, 1] one;
* the label is the feature ``label``, encoded like a stream.

``manifest.json`` beside the shards (format version 1) records the family, every stream's
per-example shape and dtype, the label's, the compression, and every shard with its split,
example count, byte size and the index of its first example in the source. Shards are written
under a temporary name, fsynced and renamed, and the manifest is written last the same way: a
shard under its final name is complete, and a directory with shards but no manifest is an
interrupted conversion.

Sharding across input pipelines (``tf.distribute.InputContext``):

* with at least as many files as pipelines, split evenly (the pipelines' example counts within
  10%), pipeline ``i`` of ``n`` reads only the files ``sorted(files)[i::n]`` (what
  ``AutoShardPolicy.FILE`` does); over one pass of each pipeline every example is read exactly
  once across the job;
* otherwise (fewer files than pipelines, or an uneven split such as 3 files over 2 workers,
  which would make one worker's epoch twice as long and its examples seen half as often), every
  pipeline reads every file in the same order and keeps every n-th record
  (``AutoShardPolicy.DATA``): again exactly once per epoch across the job, but each process reads
  all the bytes. This is logged once per process; ``sharding: file|example`` forces a mode.

Batch semantics differ from the in-memory sources on purpose: those shuffle globally and then
shard, so a multi-worker step sees exactly the single-process global batch (the exact mode, for
equivalence tests). Files cannot be shuffled globally; each pipeline shuffles its own stream (a
per-epoch file order and a ``shuffle_buffer`` of records), so a global batch is the union of the
pipelines' batches and depends on the number of pipelines. Each pipeline's epoch is one pass
over its records; with unequal record counts per pipeline, pipelines start new epochs at
different steps.

Resuming mid-epoch is exact, not approximate: the training stream is a deterministic function of
the seed, the epoch number and the pipeline (file order and shuffle seeds are derived from
``(seed, epoch, pipeline)``, interleave and parsing are deterministic), so
``dataset_fn(start_step=k)`` starts at epoch ``consumed // epoch_length`` directly and skips
``consumed % epoch_length`` serialized records (read, not parsed) to be at the position of step
``k``. Iterator checkpointing (``tf.train.Checkpoint(iterator=...)``) was not used: it stores
the shuffle buffer in every checkpoint, and in a multi-worker job only the chief's checkpoint
survives, so the other workers' positions would be lost.

Errors: bad data is reported as :class:`~dist_share.errors.DataError` naming the file, the
record, the stream and what was expected and found. Cheap checks run when a source is opened
(every file listed in its manifest, byte sizes match, the first record of every file matches
the manifest); every record is then checked as it is parsed (TensorFlow's parser is given
``file:record`` names, the stored shapes are compared in the graph), and
:meth:`RecordSource.explain` turns the resulting TensorFlow error into a DataError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as globlib
import gzip
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

FORMAT = "dist_share.tfrecord"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LABEL_KEY = "label"
SHAPE_SUFFIX = "/shape"
COMPRESSIONS = ("", "GZIP")
DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_CYCLE_LENGTH = 8
# Marks messages of the in-graph checks, so explain() can find them inside a TensorFlow error.
_MARK = "dist_share.records: "
_MARK_END = " :end"

Arrays = tuple[dict[str, np.ndarray], np.ndarray]


# -- specs and manifest ------------------------------------------------------------------------
_FLOAT_DTYPES = ("float16", "float32")
_INT_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Per-example shape and dtype of one stream (or of the label).

    Args:
        shape: per-example shape, no batch axis (``()`` for a scalar).
        dtype: NumPy dtype name; float16/float32 are stored as ``float_list``, bool and integer
            dtypes up to int64/uint32 as ``int64_list``.

    Raises:
        DataError: the dtype cannot be stored in a ``tf.train.Example`` without loss, or a
            dimension is negative.
    """

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if self.dtype not in _FLOAT_DTYPES + _INT_DTYPES:
            raise DataError(
                f"dtype {self.dtype} cannot be stored in a tf.train.Example without loss "
                f"(supported: {', '.join(_FLOAT_DTYPES + _INT_DTYPES)}; cast float64 to float32)"
            )
        if any(d < 0 for d in self.shape):
            raise DataError(f"shape {list(self.shape)} has a negative dimension")

    @property
    def kind(self) -> str:
        """The tf.train.Feature list that holds the values: ``float_list`` or ``int64_list``."""
        return "float_list" if self.dtype in _FLOAT_DTYPES else "int64_list"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it (``file`` is relative to the manifest)."""

    file: str
    split: str
    examples: int
    bytes: int
    first_example: int  # index in the split of the source of the shard's first record

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a directory of shards holds; written by :func:`write_shards`, read by every reader."""

    streams: dict[str, FeatureSpec]
    label: FeatureSpec
    shards: tuple[ShardInfo, ...]
    family: str | None = None
    compression: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: int = FORMAT_VERSION
    path: Path | None = None  # where it was loaded from (None: not saved yet)

    def examples(self, split: str | None = None) -> int:
        return sum(s.examples for s in self.shards if split is None or s.split == split)

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def shard(self, name: str) -> ShardInfo | None:
        return next((s for s in self.shards if s.file == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "family": self.family,
            "streams": {k: v.to_json() for k, v in self.streams.items()},
            "label": self.label.to_json(),
            "compression": self.compression,
            "examples": {split: self.examples(split) for split in self.splits()},
            "shards": [s.to_json() for s in self.shards],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> Manifest:
        """Parse and check a manifest; every problem names the manifest and the key."""
        where = str(path) if path else "manifest"

        def bad(key: str, why: str) -> DataError:
            return DataError(f"{where}: {key}: {why}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad("format", f"expected {FORMAT!r}; this is not a dist-share shard manifest")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise bad("version", f"is {version!r}, this dist_share reads version {FORMAT_VERSION}")
        for key in ("streams", "label", "shards"):
            if key not in data:
                raise bad(key, "missing")

        def spec(key: str, value: Any) -> FeatureSpec:
            if not isinstance(value, dict) or set(value) != {"shape", "dtype"}:
                raise bad(key, f"expected {{shape: [...], dtype: ...}}, got {value!r}")
            try:
                return FeatureSpec(tuple(value["shape"]), value["dtype"])
            except (TypeError, DataError) as e:
                raise bad(key, str(e)) from None

        if not isinstance(data["streams"], dict) or not data["streams"]:
            raise bad("streams", "expected a non-empty mapping of stream name to shape/dtype")
        streams = {name: spec(f"streams.{name}", v) for name, v in data["streams"].items()}
        shards = []
        for i, s in enumerate(data["shards"]):
            try:
                shards.append(ShardInfo(**s))
            except TypeError as e:
                raise bad(f"shards[{i}]", str(e)) from None
        compression = data.get("compression", "")
        if compression not in COMPRESSIONS:
            raise bad("compression", f"is {compression!r}, expected one of {COMPRESSIONS}")
        return cls(
            streams=streams,
            label=spec("label", data["label"]),
            shards=tuple(shards),
            family=data.get("family"),
            compression=compression,
            source=dict(data.get("source") or {}),
            version=version,
            path=path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read ``path`` (local or any filesystem tf.io.gfile knows, e.g. gs://).

        Raises:
            DataError: the file is missing, not JSON, or not a valid manifest.
        """
        from tensorflow.io import gfile

        path = Path(path) if "://" not in str(path) else path
        if not gfile.exists(str(path)):
            raise DataError(f"{path}: no such manifest")
        try:
            with gfile.GFile(str(path), "r") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e}); rerun `dist-share data convert`"
            ) from None
        return cls.from_json(data, Path(str(path)))

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        """Per-example TensorSpecs of the streams, in manifest order."""
        import tensorflow as tf

        return {
            name: tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=name)
            for name, s in self.streams.items()
        }


# -- writing -----------------------------------------------------------------------------------
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
                f"split {split!r} holds {_describe(these, this_label)} but the first split "
                f"holds {_describe(streams, label)}; every split must have the same streams"
            )
    if streams is None or label is None:
        raise DataError("nothing to write: no splits given")
    return streams, label


def _describe(streams: Mapping[str, FeatureSpec], label: FeatureSpec) -> str:
    parts = [f"{k}: {v.describe()}" for k, v in streams.items()]
    return "{" + ", ".join(parts) + f"}}, label {label.describe()}"


def _example_encoder(
    streams: Mapping[str, FeatureSpec], label: FeatureSpec
) -> Callable[[dict[str, list], Any], bytes]:
    """A function (values per stream as Python lists, label) -> serialized tf.train.Example."""
    from tensorflow.core.example import example_pb2

    def encode(values: dict[str, list], label_value: Any) -> bytes:
        ex = example_pb2.Example()
        feature = ex.features.feature
        for name, spec in streams.items():
            getattr(feature[name], spec.kind).value[:] = values[name]
            if spec.shape:
                feature[name + SHAPE_SUFFIX].int64_list.value[:] = spec.shape
        getattr(feature[LABEL_KEY], label.kind).value[:] = label_value
        return ex.SerializeToString()

    return encode


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


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Write with `write(tmp)` to a temporary name in the same directory, fsync, rename."""
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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

    encode = _example_encoder(streams, label)
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

            _write_atomically(final, write)
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

    def write_manifest(tmp: Path) -> None:
        tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")

    _write_atomically(manifest_path, write_manifest)
    if old is not None:
        keep = {s.file for s in shards}
        for s in old.shards:
            if s.file not in keep:
                with contextlib.suppress(FileNotFoundError):
                    (out / s.file).unlink()
    _fsync_dir(out)
    return manifest


# -- reading without TensorFlow's pipeline: the open-time checks ---------------------------------
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


def _read_record(path: str, compression: str, index: int) -> bytes | None:
    for i, payload in enumerate(iter_records(path, compression)):
        if i == index:
            return payload
    return None


def _feature_values(feature: Any) -> tuple[str | None, list]:
    kind = feature.WhichOneof("kind")
    return kind, list(getattr(feature, kind).value) if kind else []


def check_example(
    serialized: bytes, manifest: Manifest, where: str, family: str | None = None
) -> None:
    """Check one serialized record against the manifest.

    Raises:
        DataError: naming `where` (file and record), the stream, and expected vs found.
    """
    from tensorflow.core.example import example_pb2

    try:
        ex = example_pb2.Example.FromString(serialized)
    except Exception as e:  # protobuf's DecodeError
        raise DataError(f"{where}: not a tf.train.Example ({e})") from None
    feature = ex.features.feature
    expected = {**manifest.streams, LABEL_KEY: manifest.label}
    for name, spec in expected.items():
        what = "the label" if name == LABEL_KEY else f"stream {name!r}"
        if name not in feature:
            held = sorted(k for k in feature if not k.endswith(SHAPE_SUFFIX))
            raise DataError(f"{where}: {what} is missing (the record holds {held})")
        kind, values = _feature_values(feature[name])
        if kind != spec.kind:
            raise DataError(
                f"{where}: {what}: expected {spec.dtype} values ({spec.kind}), found {kind}"
            )
        shape = spec.shape
        if spec.shape:
            if name + SHAPE_SUFFIX not in feature:
                raise DataError(f"{where}: {what}: the record has no {name + SHAPE_SUFFIX!r}")
            shape = tuple(_feature_values(feature[name + SHAPE_SUFFIX])[1])
            if shape != spec.shape:
                raise DataError(
                    f"{where}: {what}: expected shape {list(spec.shape)}, found {list(shape)}"
                )
        if len(values) != spec.size:
            raise DataError(
                f"{where}: {what}: expected shape {list(spec.shape)} ({spec.size} values), "
                f"found {len(values)} values"
            )
    extra = sorted(
        k for k in feature if k not in expected and k[: -len(SHAPE_SUFFIX)] not in expected
    )
    if extra:
        raise DataError(
            f"{where}: the record holds features {extra} the manifest does not list "
            f"(streams: {list(manifest.streams)})"
        )


# -- the source --------------------------------------------------------------------------------
_logged_once: set[str] = set()


def _log_once(key: str, msg: str, *args: Any) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.warning(msg, *args)


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """What one input pipeline reads: file indices into the source's files, and how."""

    files: tuple[int, ...]
    by_example: bool  # True: every pipeline reads all files and keeps every n-th record
    num_pipelines: int
    pipeline_id: int
    epoch_examples: int  # records this pipeline yields per epoch


def _expand(
    patterns: str | os.PathLike | Sequence[str | os.PathLike], split: str | None
) -> list[str]:
    from tensorflow.io import gfile

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for p in patterns:
        p = str(p)
        if gfile.isdir(p):
            manifest = Manifest.load(os.path.join(p, MANIFEST_NAME))
            names = [s.file for s in manifest.shards if split is None or s.split == split]
            if not names:
                raise DataError(
                    f"{p}: the manifest lists no {split!r} shards (splits: {manifest.splits()})"
                )
            files += [os.path.join(p, n) for n in names]
        elif globlib.has_magic(p):
            matched = sorted(gfile.glob(p))
            if not matched:
                raise DataError(f"{p!r} matches no file")
            files += matched
        else:
            if not gfile.exists(p):
                raise DataError(f"{p}: no such file")
            files.append(p)
    if not files:
        raise DataError("no shard files given")
    seen: set[str] = set()
    dupes = [f for f in files if f in seen or seen.add(f)]  # type: ignore[func-returns-value]
    if dupes:
        raise DataError(f"{dupes[0]} is given twice (overlapping patterns?)")
    return sorted(files)


class RecordSource:
    """Sharded TFRecord files plus their manifest, opened and checked; makes dataset functions.

    Build one with :meth:`open`. Files are kept sorted by path, which is the order the file
    sharding uses on every worker.
    """

    def __init__(self, files: Sequence[str], manifest: Manifest, shards: Sequence[ShardInfo]):
        self.files = tuple(files)
        self.manifest = manifest
        self.shards = tuple(shards)

    @classmethod
    def open(
        cls,
        patterns: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        split: str | None = None,
        family: str | None = None,
        check_records: bool = True,
    ) -> RecordSource:
        """Resolve files (paths, globs, or shard directories) and check them against manifests.

        Args:
            patterns: a file, a glob (``data/train-*.tfrecord``), a directory (its manifest's
                shards of `split`), or a list of these.
            split: for directories: which split's shards.
            family: when given, the manifest's family must be this one.
            check_records: read the first record of every file and check it against the
                manifest (one small read per file).

        Raises:
            DataError: no file matches; a file has no manifest beside it or is not listed in
                it; manifests of different directories disagree; a file's size differs from the
                manifest's (truncated or rewritten); a first record does not match; the family
                differs.
        """
        from tensorflow.io import gfile

        files = _expand(patterns, split)
        manifests: dict[str, Manifest] = {}
        shards: list[ShardInfo] = []
        for path in files:
            directory = os.path.dirname(path) or "."
            if directory not in manifests:
                mpath = os.path.join(directory, MANIFEST_NAME)
                if not gfile.exists(mpath):
                    raise DataError(
                        f"{path}: no {MANIFEST_NAME} beside it: not written by "
                        "`dist-share data convert`, or the conversion did not finish"
                    )
                manifests[directory] = Manifest.load(mpath)
            manifest = manifests[directory]
            info = manifest.shard(os.path.basename(path))
            if info is None:
                raise DataError(
                    f"{path}: not listed in {manifest.path} (a file left from another "
                    "conversion? the manifest lists "
                    f"{[s.file for s in manifest.shards][:6]}{'...' if len(manifest.shards) > 6 else ''})"
                )
            size = gfile.stat(path).length
            if size != info.bytes:
                raise DataError(
                    f"{path}: {size} bytes but {manifest.path} records {info.bytes}: the file "
                    "is truncated or was rewritten after the conversion"
                )
            shards.append(info)
        first = next(iter(manifests.values()))
        for m in manifests.values():
            if (m.streams, m.label, m.compression) != (
                first.streams,
                first.label,
                first.compression,
            ):
                raise DataError(
                    f"{m.path} describes {_describe(m.streams, m.label)} ({m.compression or 'uncompressed'}) "
                    f"but {first.path} describes {_describe(first.streams, first.label)} "
                    f"({first.compression or 'uncompressed'}); one source needs one record format"
                )
            if family is not None and m.family not in (None, family):
                raise DataError(f"{m.path} holds {m.family} data, expected {family} data")
        source = cls(files, first, shards)
        if check_records:
            for path, info in zip(files, shards, strict=True):
                record = next(iter_records(path, first.compression), None)
                if record is None:
                    if info.examples:
                        raise DataError(
                            f"{path}: empty but {manifests[os.path.dirname(path) or '.'].path} "
                            f"records {info.examples} examples"
                        )
                    continue
                check_example(record, first, f"{path}, record 0")
        return source

    # -- facts ---------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return sum(s.examples for s in self.shards)

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        return self.manifest.input_specs()

    def plan(
        self, ctx: tf.distribute.InputContext | None = None, sharding: str = "auto"
    ) -> PipelinePlan:
        """Which files input pipeline ``ctx.input_pipeline_id`` reads, how, and how many examples.

        Args:
            ctx: the pipeline's input context (None: the only pipeline).
            sharding: ``file``: pipeline i of n reads ``files[i::n]`` (needs at least n files);
                ``example``: every pipeline reads every file and keeps every n-th record;
                ``auto``: by file when there are at least n files and they split evenly (the
                pipelines' example counts within 10% of each other), otherwise by example,
                which is logged once. Uneven file shares would make the pipelines' epochs
                differ in length, so that the examples of the smaller shares are seen more
                often in a synchronous job.

        Raises:
            DataError: ``sharding: file`` with fewer files than pipelines; an unknown mode.
        """
        n = ctx.num_input_pipelines if ctx is not None else 1
        i = ctx.input_pipeline_id if ctx is not None else 0
        if sharding not in ("auto", "file", "example"):
            raise DataError(f"sharding is {sharding!r}, expected auto, file or example")
        shares = [sum(s.examples for s in self.shards[k::n]) for k in range(n)]
        if sharding == "file" and len(self.files) < n:
            raise DataError(
                f"sharding by file needs at least one file per input pipeline: "
                f"{len(self.files)} files for {n} pipelines"
            )
        even = len(self.files) >= n and min(shares) >= 0.9 * max(shares)
        if sharding == "file" or (sharding == "auto" and even):
            mine = tuple(range(i, len(self.files), n))
            return PipelinePlan(mine, False, n, i, shares[i])
        if sharding == "auto":
            why = (
                f"{len(self.files)} shard files for {n} input pipelines"
                if len(self.files) < n
                else f"{len(self.files)} shard files do not split evenly over {n} input "
                f"pipelines (by file they would get {min(shares)} to {max(shares)} examples "
                "per epoch, and the smaller shares would be seen more often)"
            )
            _log_once(
                f"by-example:{self.files}:{n}",
                "%s: sharding by example instead (every pipeline reads all files and keeps "
                "one record in %d). Convert into a multiple of %d shards so that each worker "
                "reads only its own files.",
                why,
                n,
                n,
            )
        total = self.num_examples
        return PipelinePlan(tuple(range(len(self.files))), True, n, i, len(range(i, total, n)))

    # -- tf.data -------------------------------------------------------------------------------
    def _records(
        self,
        plan: PipelinePlan,
        epoch: tf.Tensor | None,
        seed: int,
        shuffle_buffer: int,
        cycle_length: int,
    ) -> tf.data.Dataset:
        """One pass of `plan`: (file index, record index, serialized record), shuffled if `epoch`."""
        import tensorflow as tf

        paths = tf.constant(self.files)
        compression = self.manifest.compression
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

    def _parse_fn(self) -> Callable[..., Any]:
        """(file indices, record indices, serialized records) [batch] -> (features, labels)."""
        import tensorflow as tf

        paths = tf.constant(self.files)
        streams, label = self.manifest.streams, self.manifest.label
        spec: dict[str, Any] = {}
        for name, s in {**streams, LABEL_KEY: label}.items():
            kind = tf.float32 if s.kind == "float_list" else tf.int64
            spec[name] = tf.io.FixedLenFeature(s.shape, kind)
            if s.shape:
                spec[name + SHAPE_SUFFIX] = tf.io.FixedLenFeature([len(s.shape)], tf.int64)

        def parse(files: tf.Tensor, records: tf.Tensor, serialized: tf.Tensor) -> Any:
            # TensorFlow's parser names the failing example in its errors: give it file:record.
            names = tf.strings.join(
                [tf.gather(paths, files), tf.strings.as_string(records)], separator=":"
            )
            parsed = tf.io.parse_example(serialized, spec, example_names=names)
            checks = []
            for key, (name, s) in enumerate({**streams, LABEL_KEY: label}.items()):
                if not s.shape:
                    continue
                found = parsed[name + SHAPE_SUFFIX]
                bad = tf.reduce_any(found != tf.constant(s.shape, tf.int64), axis=1)

                def message(key: int = key, found=found, bad=bad) -> tf.Tensor:
                    # Numbers only (TF escapes quotes in assertion messages); explain() words it.
                    k = tf.argmax(tf.cast(bad, tf.int32))
                    return tf.strings.join(
                        [
                            _MARK,
                            tf.strings.as_string(files[k]),
                            f"|{key}|",
                            tf.strings.as_string(records[k]),
                            "|",
                            tf.strings.reduce_join(tf.strings.as_string(found[k]), separator=","),
                            _MARK_END,
                        ]
                    )

                ok = tf.logical_not(tf.reduce_any(bad))
                msg = tf.cond(ok, lambda: tf.constant(""), message)
                checks.append(tf.debugging.Assert(ok, [msg], summarize=-1))
            with tf.control_dependencies(checks):
                features = {
                    name: tf.identity(tf.cast(parsed[name], s.dtype)) for name, s in streams.items()
                }
                labels = tf.identity(tf.cast(parsed[LABEL_KEY], label.dtype))
            return features, labels

        return parse

    def dataset_fn(
        self,
        global_batch_size: int,
        *,
        training: bool,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        start_step: int = 0,
        cycle_length: int = DEFAULT_CYCLE_LENGTH,
        sharding: str = "auto",
    ) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
        """A ``dataset_fn`` for ``distribute_datasets_from_function`` (or called with no context).

        Args:
            global_batch_size: examples per step over all replicas; each pipeline batches
                ``ctx.get_per_replica_batch_size(global_batch_size)``.
            training: True: shuffled (per-epoch file order and a record shuffle buffer),
                repeated forever, batches with drop_remainder. False: one pass in file order,
                the partial last batch kept, so that every example is evaluated once.
            seed: the shuffle seed (file orders and buffers of every epoch derive from it).
            shuffle_buffer: records held for shuffling per pipeline.
            start_step: training only: begin where step `start_step` of a run with the same
                seed, global batch and number of pipelines and replicas would be (exact resume).
            cycle_length: files read concurrently per pipeline.
            sharding: ``auto``, ``file`` or ``example``: see :meth:`plan`.

        Raises:
            DataError: (when called) a training pipeline would get no examples.
        """
        import tensorflow as tf

        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        parse = self._parse_fn()

        def dataset_fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
            ctx = ctx or tf.distribute.InputContext()
            plan = self.plan(ctx, sharding)
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            if training:
                if plan.epoch_examples == 0:
                    raise DataError(
                        f"input pipeline {plan.pipeline_id} of {plan.num_pipelines} has no "
                        f"training examples (its files: {[self.files[f] for f in plan.files]})"
                    )
                per_pipeline = max(1, ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines))
                consumed = int(start_step) * per_pipeline * per_replica
                first_epoch, offset = divmod(consumed, plan.epoch_examples)
                ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
                    lambda e: self._records(plan, e, seed, shuffle_buffer, cycle_length)
                )
                ds = ds.skip(offset).batch(per_replica, drop_remainder=True)
            else:
                ds = self._records(plan, None, seed, 0, cycle_length).batch(per_replica)
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            options = tf.data.Options()
            # Sharding is done above, per file or per record; tf.distribute must not redo it.
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

        return dataset_fn

    # -- errors --------------------------------------------------------------------------------
    def explain(self, error: BaseException) -> DataError | None:
        """The DataError behind a TensorFlow error raised while streaming this source, or None.

        Parser errors carry ``file:record`` and the stream; a shape mismatch carries this
        module's own message; a corrupted or truncated record (DataLossError, which names no
        file) is located by reading this source's files one by one.
        """
        import tensorflow as tf

        text = str(error)
        m = re.search(
            re.escape(_MARK) + r"(\d+)\|(\d+)\|(\d+)\|([\d,-]*)" + re.escape(_MARK_END), text
        )
        if m:
            file, key, record = (int(g) for g in m.groups()[:3])
            name, spec = list({**self.manifest.streams, LABEL_KEY: self.manifest.label}.items())[
                key
            ]
            what = "the label" if name == LABEL_KEY else f"stream {name!r}"
            found = [int(d) for d in m.group(4).split(",") if d]
            return DataError(
                f"{self.files[file]}, record {record}: {what}: expected shape "
                f"{list(spec.shape)}, found {found}"
            )
        m = re.search(r"Name: (.+?):(\d+), (?:Key|Feature): ([^, ]+)[ ,](.*?)(?:\n|\[\[|$)", text)
        if m:
            path, record, key, detail = m.group(1), m.group(2), m.group(3), m.group(4)
            # The record itself says best what is wrong with it; TF's words are the fallback.
            try:
                payload = _read_record(path, self.manifest.compression, int(record))
                if payload is not None:
                    check_example(payload, self.manifest, f"{path}, record {record}")
            except DataError as precise:
                return precise
            except (OSError, tf.errors.OpError):
                pass
            return DataError(self._describe_parse_error(path, record, key, detail))
        if isinstance(error, tf.errors.DataLossError):
            bad = self.find_unreadable_file()
            if bad is not None:
                return DataError(f"{bad[0]}: {bad[1]}: the file is damaged; convert the data again")
            what = re.search(r"(corrupted|truncated) record at \d+", text)
            return DataError(
                f"one of the {len(self.files)} shard files is damaged "
                f"({what.group(0) if what else text.splitlines()[0]}); convert the data again"
            )
        return None

    def _describe_parse_error(self, path: str, record: str, key: str, detail: str) -> str:
        streams = {**self.manifest.streams, LABEL_KEY: self.manifest.label}
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

    def find_unreadable_file(self) -> tuple[str, str] | None:
        """The first file TensorFlow cannot stream to the end (and why), or None."""
        import tensorflow as tf

        for path in self.files:
            ds = tf.data.TFRecordDataset(path, compression_type=self.manifest.compression)
            try:
                ds.reduce(np.int64(0), lambda n, _: n + 1)
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                first = str(e).split("[Op:")[0].split("}}")[-1].strip()
                return path, first
        return None

    @contextlib.contextmanager
    def errors_as_data_errors(self) -> Iterator[None]:
        """Re-raise TensorFlow errors that :meth:`explain` understands as a short DataError."""
        try:
            yield
        except Exception as e:
            explained = self.explain(e)
            if explained is None:
                raise
            raise explained from None

    def validate(self) -> int:
        """Stream and parse every record of every file (one pass); return the record count.

        Raises:
            DataError: the first bad file or record, named; or a file whose record count differs
                from its manifest's.
        """
        import tensorflow as tf

        parse = self._parse_fn()
        total = 0
        for f, (path, info) in enumerate(zip(self.files, self.shards, strict=True)):
            plan = PipelinePlan((f,), False, 1, 0, info.examples)
            ds = self._records(plan, None, 0, 0, 1).batch(1024).map(parse)
            count = 0
            with self.errors_as_data_errors():
                for _, labels in ds:
                    count += int(tf.shape(labels)[0])
            if count != info.examples:
                raise DataError(
                    f"{path}: holds {count} records but "
                    f"{os.path.join(os.path.dirname(path), MANIFEST_NAME)} records {info.examples}"
                )
            total += count
        return total
