"""Input pipelines: offline data sets, the user's own .npz files, and random tensors.

Every source is materialised as NumPy arrays that depend only on the data config (never on the
rank or the number of replicas), so every process of a distributed job holds the same examples.
The dataset function then shuffles with the training seed *before* sharding and batches per
replica, which makes the union of the replicas' batches at step k exactly the global batch k of
a single-process run: changing the strategy does not change what the model sees.

Sources (``data.source``):

* ``digits``: scikit-learn's bundled 8x8 digits (no download), split into train/eval images by
  ``data.split_seed``; Siamese pairs (half same digit, half different), triplets (anchor and
  positive share a class, the negative does not) or multi-view examples (N corrupted "sensor"
  views of one digit: each view is shifted, noisy and has a square occluded, so the views
  disagree and combining them helps).
* ``two_tower_synthetic``: SYNTHETIC user/item interactions with a planted structure (items
  belong to latent clusters with Zipf popularity; each user prefers a few clusters, its history
  is drawn from them; a relevant candidate comes from a preferred cluster, an irrelevant one
  from the others). Useful to check that a two-tower model learns; not real behaviour data.
* ``npz``: ``data.train_path`` / ``data.eval_path``, each one array per stream plus ``labels``.
* ``random``: random tensors of the family's shapes, for input-bound benchmarks.
* ``tfrecord``: sharded TFRecord files written by ``dist-share data convert`` (``data.tfrecord``),
  streamed per worker and never held whole (dist_share/records.py; docs/DATA.md). Each worker
  reads its own files and each example is seen once per epoch across workers; unlike the
  in-memory sources, global batches depend on the number of workers.

NumPy work happens at import time of nothing: TensorFlow is imported only by the functions that
build TensorFlow objects, so that ``dist-share config`` can check data without starting TF.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.data import checks as datacheck
from dist_share.data import records
from dist_share.errors import ConfigError, DataError
from dist_share.families.base import Arrays

if TYPE_CHECKING:
    import tensorflow as tf

    from dist_share.config.schema import DataConfig

SPLITS = ("train", "eval")
DatasetFn = Callable[["tf.distribute.InputContext"], "tf.data.Dataset"]


def _rng(data: DataConfig, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(data.split_seed), *salt])


# -- digits: the images the digit families draw their examples from -------------------------
@functools.lru_cache(maxsize=4)
def _digits_split(split_seed: int, eval_fraction: float) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1] in [0, 1]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_eval = int(round(len(labels) * eval_fraction))
    ev, tr = order[:n_eval], order[n_eval:]
    return images[tr], labels[tr], images[ev], labels[ev]


def digits_with_labels(
    data: DataConfig, split: str, salt: int
) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The split's digit images and classes, and the generator a family draws examples with."""
    tr_x, tr_y, ev_x, ev_y = _digits_split(int(data.split_seed), float(data.eval_fraction))
    images, labels = (tr_x, tr_y) if split == "train" else (ev_x, ev_y)
    return images, labels, _rng(data, salt, SPLITS.index(split))


def digits_for(
    data: DataConfig, split: str, salt: int
) -> tuple[np.ndarray, list[np.ndarray], np.random.Generator]:
    """Like `digits_with_labels`, with the image indices of each class instead of the labels."""
    images, labels, rng = digits_with_labels(data, split, salt)
    return images, [np.flatnonzero(labels == c) for c in range(10)], rng


def same_class(rng, by_class, classes: np.ndarray) -> np.ndarray:
    """One random image index of class ``classes[i]`` for every i."""
    out = np.empty(len(classes), np.int64)
    for c, members in enumerate(by_class):
        mask = classes == c
        out[mask] = rng.choice(members, int(mask.sum()))
    return out


def other_class(rng, classes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """A class different from ``classes[i]`` for every i, uniformly."""
    return (classes + rng.integers(1, num_classes, len(classes))) % num_classes


def corrupt(
    rng, images: np.ndarray, max_shift: int, noise_std: float, occlusion: int
) -> np.ndarray:
    """One "sensor" view: a random shift (zero fill), a random occluded square, Gaussian noise."""
    n, h, w, _ = images.shape
    out = np.zeros_like(images)
    dy = rng.integers(-max_shift, max_shift + 1, n)
    dx = rng.integers(-max_shift, max_shift + 1, n)
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    for sy in range(-max_shift, max_shift + 1):
        for sx in range(-max_shift, max_shift + 1):
            m = (dy == sy) & (dx == sx)
            y0, x0 = max_shift - sy, max_shift - sx
            out[m] = padded[m, y0 : y0 + h, x0 : x0 + w]
    if occlusion:
        r0 = rng.integers(0, h - occlusion + 1, n)[:, None, None]
        c0 = rng.integers(0, w - occlusion + 1, n)[:, None, None]
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        hole = (rows >= r0) & (rows < r0 + occlusion) & (cols >= c0) & (cols < c0 + occlusion)
        out[hole] = 0.0
    out += rng.normal(0.0, noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


@functools.lru_cache(maxsize=2)
def _two_tower_world(split_seed, num_users, num_items, num_clusters, preferred, history, zipf):
    """The planted structure: item clusters, Zipf popularity, user preferences and histories."""
    rng = np.random.default_rng([split_seed, 4])
    item_cluster = rng.permutation(np.arange(num_items) % num_clusters)
    rank = np.empty(num_items)
    members = [np.flatnonzero(item_cluster == c) for c in range(num_clusters)]
    for m in members:
        rank[m] = rng.permutation(len(m)) + 1
    weight = rank**-zipf  # Zipf popularity inside each cluster
    prefs = np.stack([rng.choice(num_clusters, preferred, replace=False) for _ in range(num_users)])
    cluster_p = [weight[m] / weight[m].sum() for m in members]

    def draw(clusters: np.ndarray) -> np.ndarray:
        out = np.empty(clusters.shape, np.int64)
        for c in range(num_clusters):
            mask = clusters == c
            out[mask] = rng.choice(members[c], int(mask.sum()), p=cluster_p[c])
        return out

    hist_clusters = prefs[
        np.arange(num_users)[:, None], rng.integers(0, preferred, (num_users, history))
    ]
    return item_cluster, weight, members, cluster_p, prefs, draw(hist_clusters)


def synthetic_interactions(data: DataConfig, split: str, n: int) -> Arrays:
    """``n`` two-tower examples of the synthetic world (see the module docstring)."""
    s = data.synthetic
    _, weight, members, cluster_p, prefs, histories = _two_tower_world(
        int(data.split_seed),
        s.num_users,
        s.num_items,
        s.num_clusters,
        s.preferred_clusters,
        s.history_length,
        float(s.zipf_exponent),
    )
    rng = _rng(data, 5, SPLITS.index(split))
    users = rng.integers(0, s.num_users, n)
    relevant = rng.random(n) < s.positive_fraction
    # Relevant: a preferred cluster; irrelevant: any other cluster (uniformly chosen offset).
    pos_c = prefs[users, rng.integers(0, s.preferred_clusters, n)]
    others = np.array([np.setdiff1d(np.arange(s.num_clusters), p) for p in prefs])
    neg_c = others[users, rng.integers(0, others.shape[1], n)]
    clusters = np.where(relevant, pos_c, neg_c)
    items = np.empty(n, np.int64)
    for c in range(s.num_clusters):
        mask = clusters == c
        items[mask] = rng.choice(members[c], int(mask.sum()), p=cluster_p[c])
    feats = {
        "query_user": users.astype(np.int32),
        "query_history": histories[users].astype(np.int32),
        "candidate_item": items.astype(np.int32),
    }
    return feats, relevant.astype(np.float32)


# -- random tensors of the family's shapes (input-bound benchmarks) ---------------------------
def _random(data: DataConfig, split: str, n: int) -> Arrays:
    family = data.family_spec
    rng = _rng(data, 6, SPLITS.index(split))
    feats = {}
    for name, (shape, dtype) in stream_shapes(data).items():
        if np.issubdtype(dtype, np.integer):
            s = data.synthetic
            high = s.num_users if name == "query_user" else s.num_items
            feats[name] = rng.integers(0, high, (n, *shape)).astype(dtype)
        else:
            feats[name] = rng.random((n, *shape), np.float32)
    return feats, family.random_labels(rng, n)


# -- the user's own .npz files ----------------------------------------------------------------
def _npz(data: DataConfig, split: str) -> Arrays:
    from_train = split == "train" or not data.eval_path
    key = "data.train_path" if from_train else "data.eval_path"
    path = Path(data.train_path if from_train else data.eval_path)
    feats, labels = _read_npz(path, key, data)
    if from_train and data.eval_path is None:
        # No eval file: hold out data.eval_fraction of the training file, split by data.split_seed.
        order = _rng(data, 7).permutation(len(labels))
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
    family = data.family_spec
    want = data.streams
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
    family.check_labels(labels, f"{key} ({path}, 'labels')")
    feats = {}
    for name in want:
        a = arrays[name]
        if len(a) != len(labels):
            raise DataError(
                f"{path}: stream {name!r} has {len(a)} examples but 'labels' has {len(labels)}"
            )
        datacheck.check_stream(path, name, a)  # strings, NaN and inf, named before training
        feats[name] = a.astype(family.stream_dtype(name), copy=False)
    return feats, labels.astype(family.label_dtype, copy=False)


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
    return data.family_spec.examples(data, split, n)


def stream_shapes(data: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-example shape and dtype of every stream, without TensorFlow (for config checks)."""
    family = data.family_spec
    if data.source == "tfrecord":
        train, evals = record_source(data, "train"), record_source(data, "eval")
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
    return {s: (shape, np.dtype(np.float32)) for s in data.streams}


def input_specs(data: DataConfig) -> dict[str, tf.TensorSpec]:
    """Per-example TensorSpecs of the streams (no batch axis), in model input order."""
    import tensorflow as tf

    return {
        name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
        for name, (shape, dtype) in stream_shapes(data).items()
    }


def check_element_spec(element_spec: Any, stream_names: Sequence[str]) -> None:
    """Dataset elements must be ``(features, labels)`` with exactly the model's streams."""
    features = element_spec[0] if isinstance(element_spec, tuple) else element_spec
    if not isinstance(features, Mapping):
        raise DataError(f"dataset elements must be (features_dict, labels), got {element_spec}")
    names = set(stream_names)
    missing, extra = names - set(features), set(features) - names
    if missing or extra:
        raise DataError(
            f"dataset streams do not match the model: missing {sorted(missing)}, extra {sorted(extra)}"
        )


def train_input(dataset_fn: DatasetFn, start_step: int, stream_names: Sequence[str]) -> DatasetFn:
    """The training input of a run resumed at ``start_step``: checked, repeated, and advanced
    past what the run already consumed.

    Skipping is per input pipeline: one pipeline feeds num_replicas / num_pipelines replicas.
    """

    starting_at = getattr(dataset_fn, "starting_at", None)
    if starting_at is not None and start_step:
        # A source that can start at a step itself (TFRecord shards: it jumps to the epoch and
        # skips serialized records instead of replaying and parsing every batch since step 0).
        dataset_fn, start_step = starting_at(start_step), 0

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = dataset_fn(ctx)
        check_element_spec(ds.element_spec, stream_names)
        ds = ds.repeat()
        per_pipeline = max(1, ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines))
        return ds.skip(start_step * per_pipeline) if start_step else ds

    return fn


def make_dataset_fn(
    data: DataConfig, split: str, global_batch_size: int, seed: int
) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
    """A ``dataset_fn`` for ``distribute_datasets_from_function`` (or called with no context).

    Train: shuffled with ``seed`` (reshuffled each epoch, same order in every process), repeated
    forever, sharded, batched per replica with drop_remainder. Eval: one pass, in order, sharded,
    partial last batch kept so that every example is evaluated once.
    """
    import tensorflow as tf

    if data.source == "tfrecord":
        return _records_dataset_fn(data, split, global_batch_size, seed)
    feats, labels = load_arrays(data, split)
    n = len(labels)
    if split == "train" and n < global_batch_size:
        raise ConfigError(
            "training.batch_size",
            f"is {global_batch_size} but the train split has only {n} examples",
        )

    def dataset_fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        ctx = ctx or tf.distribute.InputContext()
        ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        if split == "train":
            buffer = min(n, int(data.shuffle_buffer))
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        if ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        ds = ds.batch(per_replica, drop_remainder=split == "train")
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


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


def record_source(data: DataConfig, split: str) -> records.RecordSource:
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
        source = records.RecordSource.open(pattern, split=split, family=data.family)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    want, have = data.streams, list(source.manifest.streams)
    if sorted(want) != sorted(have):
        raise DataError(
            f"{key}: the shards hold streams {have} but family {data.family} with this config "
            f"needs {want} (converted from another config?)"
        )
    label = source.manifest.label
    if label.shape or label.dtype != data.family_spec.label_dtype:
        raise DataError(
            f"{key}: the shards' labels are {label.describe()}, family {data.family} needs "
            f"{data.family_spec.label_dtype} []"
        )
    return source


def _records_dataset_fn(data: DataConfig, split: str, global_batch_size: int, seed: int) -> Any:
    source = record_source(data, split)
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


def explain_input_error(error: BaseException, *dataset_fns: Any) -> DataError | None:
    """A short DataError (file, record, stream) for a TensorFlow error raised while streaming
    the shards behind `dataset_fns` (None when it is not about them)."""
    for fn in dataset_fns:
        source = getattr(fn, "source", None)
        if source is not None:
            explained = source.explain(error)
            if explained is not None:
                return explained
    return None


def convert(
    data: DataConfig,
    out: str | Path,
    shards: int,
    eval_shards: int | None = None,
    compression: str = "",
    overwrite: bool = False,
    progress: bool | None = None,
) -> records.Manifest:
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
    return records.write_shards(
        out,
        splits,
        counts,
        family=data.family,
        source=description,
        compression=compression,
        overwrite=overwrite,
        progress=progress,
    )
