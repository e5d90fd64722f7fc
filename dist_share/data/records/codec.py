"""One record: a data set example as a ``tf.train.Example`` (encoding, checking, batched parsing).

The feature layout (a stream's flat values, ``<stream>/shape``, ``label``) is described in
docs/DATA.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dist_share.data.records.manifest import FeatureSpec, Manifest
from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

LABEL_KEY = "label"
SHAPE_SUFFIX = "/shape"
# Marks messages of the in-graph checks, so shape_check_failure() can find them inside a
# TensorFlow error.
_MARK = "dist_share shard check: "
_MARK_END = " :end"


def example_encoder(
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


def parse_fn(files: Sequence[str], manifest: Manifest) -> Callable[..., Any]:
    """(file indices, record indices, serialized records) [batch] -> (features, labels).

    Indices are into `files`; a record whose stored shape differs from the manifest's fails an
    in-graph check whose message :func:`shape_check_failure` reads back.
    """
    import tensorflow as tf

    paths = tf.constant(files)
    streams, label = manifest.streams, manifest.label
    spec: dict[str, Any] = {}
    for name, s in {**streams, LABEL_KEY: label}.items():
        kind = tf.float32 if s.kind == "float_list" else tf.int64
        spec[name] = tf.io.FixedLenFeature(s.shape, kind)
        if s.shape:
            spec[name + SHAPE_SUFFIX] = tf.io.FixedLenFeature([len(s.shape)], tf.int64)

    def parse(file_ids: tf.Tensor, records: tf.Tensor, serialized: tf.Tensor) -> Any:
        # TensorFlow's parser names the failing example in its errors: give it file:record.
        names = tf.strings.join(
            [tf.gather(paths, file_ids), tf.strings.as_string(records)], separator=":"
        )
        parsed = tf.io.parse_example(serialized, spec, example_names=names)
        checks = []
        for key, (name, s) in enumerate({**streams, LABEL_KEY: label}.items()):
            if not s.shape:
                continue
            found = parsed[name + SHAPE_SUFFIX]
            bad = tf.reduce_any(found != tf.constant(s.shape, tf.int64), axis=1)

            def message(key: int = key, found=found, bad=bad) -> tf.Tensor:
                # Numbers only (TF escapes quotes in assertion messages); the diagnosis words it.
                k = tf.argmax(tf.cast(bad, tf.int32))
                return tf.strings.join(
                    [
                        _MARK,
                        tf.strings.as_string(file_ids[k]),
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


def shape_check_failure(text: str) -> tuple[int, int, int, list[int]] | None:
    """(file index, stream index, record index, found shape) from a failed in-graph shape check
    of :func:`parse_fn` in a TensorFlow error's text, or None. The stream index counts the
    manifest's streams, then the label."""
    m = re.search(re.escape(_MARK) + r"(\d+)\|(\d+)\|(\d+)\|([\d,-]*)" + re.escape(_MARK_END), text)
    if m is None:
        return None
    file, key, record = (int(g) for g in m.groups()[:3])
    return file, key, record, [int(d) for d in m.group(4).split(",") if d]
