"""The inputs of a run: a config's data opened as arrays, shards and dataset functions, once.

Every in-memory source depends only on the data config, never on the rank or the number of
replicas, so every process of a job holds the same examples (docs/DATA.md lists the sources).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.config.schema import DataConfig
from dist_share.data.balanced import ClassBalancedBatches
from dist_share.data.checks import check_stream
from dist_share.data.pipeline import arrays_dataset_fn, explain_input_error, labels_from_stream
from dist_share.data.records.manifest import Manifest
from dist_share.data.records.source import RecordSource
from dist_share.data.records.writer import write_shards
from dist_share.data.types import SPLITS, Arrays, DatasetFn, split_rng
from dist_share.errors import ConfigError, DataError
from dist_share.families.registry import get_family

if TYPE_CHECKING:
    import tensorflow as tf


class RunInputs:
    """The data of one run, opened once and shared by the CLI and the trainer: the streams'
    shapes, the input specs and the train and eval dataset functions.

    Opening checks the user's files (streams, shapes, labels) without starting TensorFlow's
    runtime, so a bad file is reported before anything is created.
    """

    def __init__(self, data: DataConfig, global_batch_size: int, seed: int) -> None:
        self.data = data
        sources = None
        if data.source == "tfrecord":
            sources = {split: record_source(data, split) for split in SPLITS}
        self.shapes = stream_shapes(data, sources)
        self.train_fn, self.eval_fn = (
            make_dataset_fn(data, split, global_batch_size, seed, sources and sources[split])
            for split in SPLITS
        )

    @functools.cached_property
    def specs(self) -> dict[str, tf.TensorSpec]:
        """Per-example TensorSpecs of the streams (no batch axis), in model input order."""
        return _specs(self.shapes)

    def explain(self, error: BaseException) -> DataError | None:
        """A short DataError (file, record, stream) for a TensorFlow error about these inputs."""
        return explain_input_error(error, self.train_fn, self.eval_fn)


def _random(data: DataConfig, split: str, n: int) -> Arrays:
    family = get_family(data.family)
    rng = split_rng(data.split_seed, 6, SPLITS.index(split))
    feats = {}
    for name, (shape, dtype) in stream_shapes(data).items():
        if np.issubdtype(dtype, np.integer):
            s = data.synthetic
            high = s.num_users if name == "query_user" else s.num_items
            feats[name] = rng.integers(0, high, (n, *shape)).astype(dtype)
        else:
            feats[name] = rng.random((n, *shape), np.float32)
    return feats, family.random_labels(rng, n, data)


# -- the user's own .npz files ----------------------------------------------------------------
def _npz(data: DataConfig, split: str) -> Arrays:
    from_train = split == "train" or not data.eval_path
    key = "data.train_path" if from_train else "data.eval_path"
    path = Path(data.train_path if from_train else data.eval_path)
    feats, labels = _read_npz(path, key, data)
    if from_train and data.eval_path is None:
        # No eval file: hold out data.eval_fraction of the training file, split by data.split_seed.
        order = split_rng(data.split_seed, 7).permutation(len(labels))
        n_eval = max(1, int(round(len(labels) * data.eval_fraction)))
        take = order[:n_eval] if split == "eval" else order[n_eval:]
        feats, labels = {k: v[take] for k, v in feats.items()}, labels[take]
    return feats, labels


@functools.lru_cache(maxsize=4)
def _load_npz_file(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_npz(path: Path, key: str, data: DataConfig) -> Arrays:
    if not path.is_file():
        raise ConfigError(key, f"{str(path)!r} does not exist (expected a .npz file)")
    try:
        arrays = dict(_load_npz_file(str(path.resolve())))
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {str(path)!r} as a .npz file: {e}") from None
    family = get_family(data.family)
    want = family.streams(data)
    if "labels" not in arrays:
        raise ConfigError(key, f"{path} has no 'labels' array (it holds {sorted(arrays)})")
    labels = arrays.pop("labels")
    if sorted(arrays) != sorted(want):
        hint = " (data.num_views sets the number of views)" if family.name == "multiview" else ""
        raise ConfigError(
            key if family.name != "multiview" else "data.num_views",
            f"{path} holds {len(arrays)} streams {sorted(arrays)} but family {family.name} with "
            f"this config expects {len(want)} streams {want}{hint}",
        )
    if len(labels) == 0:
        raise ConfigError(key, f"{path} holds no examples ('labels' is empty)")
    family.check_labels(labels, f"{key} ({path}, 'labels')", data)
    feats = {}
    for name in want:
        a = arrays[name]
        if len(a) != len(labels):
            raise DataError(
                f"{path}: stream {name!r} has {len(a)} examples but 'labels' has {len(labels)}"
            )
        check_stream(path, name, a)  # strings, NaN and inf, named before training
        feats[name] = a.astype(family.stream_dtype(name), copy=False)
    return feats, labels.astype(family.dtype_of_labels(data), copy=False)


# -- what the trainer and the model builder ask for -----------------------------------------
def load_arrays(data: DataConfig, split: str) -> Arrays:
    """All examples of one split as NumPy arrays: ({stream: [n, ...]}, labels [n])."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = data.train_examples if split == "train" else data.eval_examples
    if data.source == "tfrecord":
        raise ConfigError(
            "data.source", "tfrecord data is streamed from its files, never loaded into memory"
        )
    if data.source == "npz":
        return _npz(data, split)
    if data.source == "random":
        num = data.random.num_examples
        return _random(data, split, num if split == "train" else min(n, num))
    return get_family(data.family).examples(data, split, n)


def stream_shapes(
    data: DataConfig, sources: Mapping[str, RecordSource] | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-example shape and dtype of every stream, without TensorFlow (for config checks).

    ``sources``: the splits' shards when the caller has opened them already (``source: tfrecord``).
    """
    family = get_family(data.family)
    if data.source == "tfrecord":
        sources = sources or {split: record_source(data, split) for split in SPLITS}
        train, evals = sources["train"], sources["eval"]
        shapes = {k: (v.shape, np.dtype(v.dtype)) for k, v in train.manifest.streams.items()}
        eval_shapes = {k: (v.shape, np.dtype(v.dtype)) for k, v in evals.manifest.streams.items()}
        if eval_shapes != shapes:
            raise DataError(
                f"the eval shards hold streams {eval_shapes} but the train shards {shapes}"
            )
        return shapes
    if data.source == "npz":
        feats, _ = _npz(data, "train")
        if data.eval_path:
            ev, _ = _npz(data, "eval")
            for name in feats:
                if ev[name].shape[1:] != feats[name].shape[1:]:
                    raise DataError(
                        f"stream {name!r}: train examples have shape {feats[name].shape[1:]} "
                        f"but eval examples {ev[name].shape[1:]}"
                    )
        return {k: (v.shape[1:], v.dtype) for k, v in feats.items()}
    if family.name == "two_tower":
        h = data.synthetic.history_length
        shapes = {"query_user": (), "query_history": (h,), "candidate_item": ()}
        return {k: (shape, np.dtype(np.int32)) for k, shape in shapes.items()}
    shape = tuple(data.random.image_shape) if data.source == "random" else (8, 8, 1)
    return {s: (shape, np.dtype(np.float32)) for s in family.streams(data)}


def input_specs(
    data: DataConfig, sources: Mapping[str, RecordSource] | None = None
) -> dict[str, tf.TensorSpec]:
    """Per-example TensorSpecs of the streams (no batch axis), in model input order."""
    return _specs(stream_shapes(data, sources))


def _specs(shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, tf.TensorSpec]:
    import tensorflow as tf

    return {
        name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
        for name, (shape, dtype) in shapes.items()
    }


def make_dataset_fn(
    data: DataConfig,
    split: str,
    global_batch_size: int,
    seed: int,
    source: RecordSource | None = None,
) -> DatasetFn:
    """A ``dataset_fn`` for ``distribute_datasets_from_function`` (or called with no context);
    see `dist_share.data.pipeline.arrays_dataset_fn`. ``source``: the split's shards, if opened."""
    label_stream = get_family(data.family).label_stream(data)
    if data.source == "tfrecord":
        fn = _records_dataset_fn(data, split, global_batch_size, seed, source)
        return labels_from_stream(fn, label_stream) if label_stream else fn
    feats, labels = load_arrays(data, split)
    if split == "train" and len(labels) < global_batch_size:
        raise ConfigError(
            "training.batch_size",
            f"is {global_batch_size} but the train split has only {len(labels)} examples",
        )
    if label_stream:
        labels = feats[label_stream]
    balanced = None
    if split == "train" and data.sampler.type == "class_balanced":
        s = data.sampler
        balanced = ClassBalancedBatches(labels, s.classes_per_batch, s.examples_per_class, seed)
    return arrays_dataset_fn(
        feats, labels, split, global_batch_size, seed, data.shuffle_buffer, balanced
    )


# -- TFRecord shards --------------------------------------------------------------------------
def _records_pattern(data: DataConfig, split: str) -> tuple[str, str]:
    """(what to open, its config key) for a split of ``source: tfrecord``."""
    tf_cfg = data.tfrecord
    if split == "train" or tf_cfg.eval:
        key = "data.tfrecord.train" if split == "train" else "data.tfrecord.eval"
        return str(tf_cfg.train if split == "train" else tf_cfg.eval), key
    if not Path(str(tf_cfg.train)).is_dir():
        raise ConfigError(
            "data.tfrecord.eval",
            "is required when data.tfrecord.train is not a directory "
            f"(got {tf_cfg.train!r}; give the eval shards' directory or glob)",
        )
    return str(tf_cfg.train), "data.tfrecord.train"


def record_source(data: DataConfig, split: str) -> RecordSource:
    """The opened and checked shards of one split (``source: tfrecord``).

    Raises:
        ConfigError: the configured path does not exist (the message gives the convert command).
        DataError: the shards or their manifest are wrong, or hold other streams than the
            family needs; the message starts with the config key.
    """
    import glob

    pattern, key = _records_pattern(data, split)
    if not glob.has_magic(pattern) and "://" not in pattern and not Path(pattern).exists():
        raise ConfigError(
            key,
            f"{pattern!r} does not exist; write the shards first, e.g. "
            f"`dist-share data convert configs/siamese_digits.yaml --out {pattern}` "
            "(docs/DATA.md)",
        )
    try:
        source = RecordSource.open(pattern, split=split, family=data.family)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    family = get_family(data.family)
    want, have = family.streams(data), list(source.manifest.streams)
    if sorted(want) != sorted(have):
        raise DataError(
            f"{key}: the shards hold streams {have} but family {data.family} with this config "
            f"needs {want} (converted from another config?)"
        )
    label, dtype = source.manifest.label, family.dtype_of_labels(data)
    if label.shape or label.dtype != dtype:
        raise DataError(
            f"{key}: the shards' labels are {label.describe()}, family {data.family} with this "
            f"config needs {dtype} []"
        )
    return source


def _records_dataset_fn(
    data: DataConfig, split: str, global_batch_size: int, seed: int, source: RecordSource | None
) -> Any:
    source = source or record_source(data, split)
    if split == "train" and source.num_examples < global_batch_size:
        raise ConfigError(
            "training.batch_size",
            f"is {global_batch_size} but the train shards hold only {source.num_examples} examples",
        )

    def make(start_step: int) -> DatasetFn:
        fn = source.dataset_fn(
            global_batch_size,
            training=split == "train",
            seed=seed,
            shuffle_buffer=data.shuffle_buffer,
            start_step=start_step,
            cycle_length=data.tfrecord.cycle_length,
            sharding=data.tfrecord.sharding,
        )
        fn.source = source  # type: ignore[attr-defined]
        if split == "train":
            fn.starting_at = make  # type: ignore[attr-defined]
        return fn

    return make(0)


def convert(
    data: DataConfig,
    out: str | Path,
    shards: int,
    eval_shards: int | None = None,
    compression: str = "",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Write the train and eval splits of an in-memory source as TFRecord shards + manifest."""
    if data.source == "tfrecord":
        raise ConfigError("data.source", "is already tfrecord; convert from an in-memory source")
    splits = {split: load_arrays(data, split) for split in SPLITS}
    counts = {"train": shards, "eval": min(eval_shards or shards, len(splits["eval"][1]))}
    description = {
        "source": data.source,
        "family": data.family,
        "split_seed": data.split_seed,
        "train_examples": len(splits["train"][1]),
        "eval_examples": len(splits["eval"][1]),
    }
    if data.source == "npz":
        description.update(train_path=data.train_path, eval_path=data.eval_path)
    return write_shards(
        out,
        splits,
        counts,
        family=data.family,
        source=description,
        compression=compression,
        overwrite=overwrite,
        progress=progress,
    )
