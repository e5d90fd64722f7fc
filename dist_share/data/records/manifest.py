"""The shards' ``manifest.json``: its format, loading and checks, and the per-stream specs it records.

The record format and the manifest's fields are described in docs/DATA.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

FORMAT = "dist_share.tfrecord"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPRESSIONS = ("", "GZIP")

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


def describe_streams(streams: Mapping[str, FeatureSpec], label: FeatureSpec) -> str:
    """``{left: float32 [8, 8, 1], ...}, label float32 []``, for messages."""
    parts = [f"{k}: {v.describe()}" for k, v in streams.items()]
    return "{" + ", ".join(parts) + f"}}, label {label.describe()}"
