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

NumPy work happens at import time of nothing: TensorFlow is imported only by the functions that
build TensorFlow objects, so that ``dist-share config`` can check data without starting TF.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share import datacheck
from dist_share.config import family_streams
from dist_share.errors import ConfigError, DataError

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "eval")
Arrays = tuple[dict[str, np.ndarray], np.ndarray]


def _rng(data_cfg: Mapping, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(data_cfg["split_seed"]), *salt])


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


def _digit_images(data_cfg: Mapping, split: str) -> tuple[np.ndarray, np.ndarray]:
    tr_x, tr_y, ev_x, ev_y = _digits_split(
        int(data_cfg["split_seed"]), float(data_cfg["eval_fraction"])
    )
    return (tr_x, tr_y) if split == "train" else (ev_x, ev_y)


def _same_class(rng, by_class, classes: np.ndarray) -> np.ndarray:
    """One random image index of class ``classes[i]`` for every i."""
    out = np.empty(len(classes), np.int64)
    for c, members in enumerate(by_class):
        mask = classes == c
        out[mask] = rng.choice(members, int(mask.sum()))
    return out


def _other_class(rng, classes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    return (classes + rng.integers(1, num_classes, len(classes))) % num_classes


def _pairs(data_cfg: Mapping, split: str, n: int) -> Arrays:
    images, labels = _digit_images(data_cfg, split)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = _rng(data_cfg, 1, SPLITS.index(split))
    same = rng.permutation(np.arange(n) < n // 2)  # balanced: exactly half the pairs match
    ca = rng.integers(0, 10, n)
    cb = np.where(same, ca, _other_class(rng, ca))
    left, right = _same_class(rng, by_class, ca), _same_class(rng, by_class, cb)
    return {"left": images[left], "right": images[right]}, same.astype(np.float32)


def _triplets(data_cfg: Mapping, split: str, n: int) -> Arrays:
    images, labels = _digit_images(data_cfg, split)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    rng = _rng(data_cfg, 2, SPLITS.index(split))
    ca = rng.integers(0, 10, n)
    anchor, positive = _same_class(rng, by_class, ca), _same_class(rng, by_class, ca)
    negative = _same_class(rng, by_class, _other_class(rng, ca))
    feats = {"anchor": images[anchor], "positive": images[positive], "negative": images[negative]}
    return feats, np.zeros(n, np.float32)


def _corrupt(
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


def _multiview(data_cfg: Mapping, split: str, n: int) -> Arrays:
    images, labels = _digit_images(data_cfg, split)
    rng = _rng(data_cfg, 3, SPLITS.index(split))
    idx = rng.integers(0, len(labels), n)
    v = data_cfg["views"]
    feats = {
        f"view{i}": _corrupt(rng, images[idx], v["max_shift"], v["noise_std"], v["occlusion"])
        for i in range(data_cfg["num_views"])
    }
    return feats, labels[idx]


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


def _two_tower(data_cfg: Mapping, split: str, n: int) -> Arrays:
    s = data_cfg["synthetic"]
    if s["preferred_clusters"] >= s["num_clusters"]:
        raise ConfigError(
            "data.synthetic.preferred_clusters",
            f"is {s['preferred_clusters']}, expected fewer than data.synthetic.num_clusters ({s['num_clusters']})",
        )
    _, weight, members, cluster_p, prefs, histories = _two_tower_world(
        int(data_cfg["split_seed"]),
        s["num_users"],
        s["num_items"],
        s["num_clusters"],
        s["preferred_clusters"],
        s["history_length"],
        float(s["zipf_exponent"]),
    )
    rng = _rng(data_cfg, 5, SPLITS.index(split))
    users = rng.integers(0, s["num_users"], n)
    relevant = rng.random(n) < s["positive_fraction"]
    # Relevant: a preferred cluster; irrelevant: any other cluster (uniformly chosen offset).
    pos_c = prefs[users, rng.integers(0, s["preferred_clusters"], n)]
    others = np.array([np.setdiff1d(np.arange(s["num_clusters"]), p) for p in prefs])
    neg_c = others[users, rng.integers(0, others.shape[1], n)]
    clusters = np.where(relevant, pos_c, neg_c)
    items = np.empty(n, np.int64)
    for c in range(s["num_clusters"]):
        mask = clusters == c
        items[mask] = rng.choice(members[c], int(mask.sum()), p=cluster_p[c])
    feats = {
        "query_user": users.astype(np.int32),
        "query_history": histories[users].astype(np.int32),
        "candidate_item": items.astype(np.int32),
    }
    return feats, relevant.astype(np.float32)


def _random(data_cfg: Mapping, split: str, n: int) -> Arrays:
    family = data_cfg["family"]
    rng = _rng(data_cfg, 6, SPLITS.index(split))
    if family == "two_tower":
        s = data_cfg["synthetic"]
        feats = {
            "query_user": rng.integers(0, s["num_users"], n).astype(np.int32),
            "query_history": rng.integers(0, s["num_items"], (n, s["history_length"])).astype(
                np.int32
            ),
            "candidate_item": rng.integers(0, s["num_items"], n).astype(np.int32),
        }
        return feats, rng.integers(0, 2, n).astype(np.float32)
    shape = tuple(data_cfg["random"]["image_shape"])
    streams = family_streams(family, data_cfg["num_views"])
    feats = {name: rng.random((n, *shape), np.float32) for name in streams}
    if family == "multiview":
        return feats, rng.integers(0, 10, n).astype(np.int32)
    if family == "triplet":
        return feats, np.zeros(n, np.float32)
    return feats, rng.integers(0, 2, n).astype(np.float32)


def _expected_dtype(family: str) -> dict[str, Any]:
    if family == "two_tower":
        return {"query_user": np.int32, "query_history": np.int32, "candidate_item": np.int32}
    return {}


def _npz(data_cfg: Mapping, split: str) -> Arrays:
    key = "data.train_path" if split == "train" or not data_cfg["eval_path"] else "data.eval_path"
    path = Path(data_cfg["train_path"] if key == "data.train_path" else data_cfg["eval_path"])
    feats, labels = _read_npz(path, key, data_cfg)
    if key == "data.train_path" and data_cfg["eval_path"] is None:
        # No eval file: hold out data.eval_fraction of the training file, split by data.split_seed.
        order = _rng(data_cfg, 7).permutation(len(labels))
        n_eval = max(1, int(round(len(labels) * data_cfg["eval_fraction"])))
        take = order[:n_eval] if split == "eval" else order[n_eval:]
        feats, labels = {k: v[take] for k, v in feats.items()}, labels[take]
    return feats, labels


@functools.lru_cache(maxsize=4)
def _load_npz_file(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_npz(path: Path, key: str, data_cfg: Mapping) -> Arrays:
    if not path.is_file():
        raise ConfigError(key, f"{str(path)!r} does not exist (expected a .npz file)")
    try:
        arrays = dict(_load_npz_file(str(path.resolve())))
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {str(path)!r} as a .npz file: {e}") from None
    family = data_cfg["family"]
    want = family_streams(family, data_cfg["num_views"])
    if "labels" not in arrays:
        raise ConfigError(key, f"{path} has no 'labels' array (it holds {sorted(arrays)})")
    labels = arrays.pop("labels")
    if sorted(arrays) != sorted(want):
        hint = " (data.num_views sets the number of views)" if family == "multiview" else ""
        raise ConfigError(
            key if family != "multiview" else "data.num_views",
            f"{path} holds {len(arrays)} streams {sorted(arrays)} but family {family} with this "
            f"config expects {len(want)} streams {want}{hint}",
        )
    dtypes = _expected_dtype(family)
    feats = {}
    for name in want:
        a = arrays[name]
        if len(a) != len(labels):
            raise DataError(
                f"{path}: stream {name!r} has {len(a)} examples but 'labels' has {len(labels)}"
            )
        datacheck.check_stream(path, name, a)  # issue 11: strings, NaN, inf named here
        feats[name] = a.astype(dtypes.get(name, np.float32), copy=False)
    datacheck.check_labels(path, labels, family, data_cfg.get("num_classes"))
    label_dtype = np.int32 if family == "multiview" else np.float32
    return feats, labels.astype(label_dtype, copy=False)


def load_arrays(data_cfg: Mapping, split: str) -> Arrays:
    """All examples of one split as NumPy arrays: ({stream: [n, ...]}, labels [n])."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source, family = data_cfg["source"], data_cfg["family"]
    n = data_cfg["train_examples"] if split == "train" else data_cfg["eval_examples"]
    if source == "npz":
        return _npz(data_cfg, split)
    if source == "random":
        n = (
            data_cfg["random"]["num_examples"]
            if split == "train"
            else min(n, data_cfg["random"]["num_examples"])
        )
        return _random(data_cfg, split, n)
    if source == "two_tower_synthetic":
        return _two_tower(data_cfg, split, n)
    make = {"siamese": _pairs, "triplet": _triplets, "multiview": _multiview}.get(family)
    if make is None:
        raise ConfigError("data.source", f"digits has no {family} examples")
    return make(data_cfg, split, n)


def stream_shapes(data_cfg: Mapping) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-example shape and dtype of every stream, without TensorFlow (for config checks)."""
    family = data_cfg["family"]
    if data_cfg["source"] == "npz":
        feats, _ = _npz(data_cfg, "train")
        if data_cfg["eval_path"]:
            ev, _ = _npz(data_cfg, "eval")
            for name in feats:
                if ev[name].shape[1:] != feats[name].shape[1:]:
                    raise DataError(
                        f"stream {name!r}: train examples have shape {feats[name].shape[1:]} "
                        f"but eval examples {ev[name].shape[1:]}"
                    )
        return {k: (v.shape[1:], v.dtype) for k, v in feats.items()}
    if family == "two_tower":
        h = data_cfg["synthetic"]["history_length"]
        return {
            "query_user": ((), np.dtype(np.int32)),
            "query_history": ((h,), np.dtype(np.int32)),
            "candidate_item": ((), np.dtype(np.int32)),
        }
    shape = (
        tuple(data_cfg["random"]["image_shape"]) if data_cfg["source"] == "random" else (8, 8, 1)
    )
    return {s: (shape, np.dtype(np.float32)) for s in family_streams(family, data_cfg["num_views"])}


def input_specs(data_cfg: Mapping) -> dict[str, tf.TensorSpec]:
    """Per-example TensorSpecs of the streams (no batch axis), in model input order."""
    import tensorflow as tf

    return {
        name: tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)
        for name, (shape, dtype) in stream_shapes(data_cfg).items()
    }


def make_dataset_fn(
    data_cfg: Mapping, split: str, global_batch_size: int, seed: int
) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
    """A ``dataset_fn`` for ``distribute_datasets_from_function`` (or called with no context).

    Train: shuffled with ``seed`` (reshuffled each epoch, same order in every process), repeated
    forever, sharded, batched per replica with drop_remainder. Eval: one pass, in order, sharded,
    partial last batch kept so that every example is evaluated once.
    """
    import tensorflow as tf

    feats, labels = load_arrays(data_cfg, split)
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
            buffer = min(n, int(data_cfg["shuffle_buffer"]))
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        if ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        ds = ds.batch(per_replica, drop_remainder=split == "train")
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn
