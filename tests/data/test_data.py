"""The data sets: what each family's examples mean, splits, the planted structure, sharding, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_share.config.schema import DataConfig
from dist_share.data.digits import digits_with_labels
from dist_share.data.synthetic import two_tower_world
from dist_share.data.types import SPLITS
from dist_share.errors import ConfigError, DataError
from dist_share.families.registry import get_family
from dist_share.run.inputs import input_specs, load_arrays, make_dataset_fn, stream_shapes
from dist_share.run.resolve import validate


def _cfg(family: str, **data_keys) -> DataConfig:
    return validate({"model": {"family": family}, "data": data_keys}).data


def _class_of(images: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Recover each image's digit by exact lookup in the split's images (pairs copy images)."""
    lookup = {}
    for split in SPLITS:
        x, y, _ = digits_with_labels(cfg, split, salt=0)
        lookup.update({img.tobytes(): int(label) for img, label in zip(x, y, strict=True)})
    return np.array([lookup[img.tobytes()] for img in images])


def test_train_and_eval_digit_images_are_disjoint_and_fixed_by_the_seed() -> None:
    cfg = _cfg("siamese")
    tr, _, _ = digits_with_labels(cfg, "train", salt=0)
    ev, _, _ = digits_with_labels(cfg, "eval", salt=0)
    assert len(tr) + len(ev) == 1797 and abs(len(ev) / 1797 - cfg.eval_fraction) < 0.01
    assert not {x.tobytes() for x in tr} & {x.tobytes() for x in ev} - {
        np.zeros_like(tr[0]).tobytes()
    }
    other = digits_with_labels(_cfg("siamese", split_seed=1), "eval", salt=0)[0]
    assert not np.array_equal(ev, other)


def test_siamese_pairs_are_balanced_and_labelled_by_class_identity() -> None:
    cfg = _cfg("siamese", train_examples=2000)
    feats, labels = load_arrays(cfg, "train")
    assert labels.dtype == np.float32 and labels.mean() == 0.5
    same = _class_of(feats["left"], cfg) == _class_of(feats["right"], cfg)
    np.testing.assert_array_equal(same, labels == 1.0)
    assert (
        feats["left"].shape == (2000, 8, 8, 1)
        and feats["left"].min() >= 0.0
        and feats["left"].max() <= 1.0
    )
    again, _ = load_arrays(cfg, "train")
    np.testing.assert_array_equal(
        again["left"], feats["left"]
    )  # every process builds the same pairs


def test_triplets_share_the_anchor_class_only_with_the_positive() -> None:
    cfg = _cfg("triplet", eval_examples=500)
    feats, labels = load_arrays(cfg, "eval")
    a, p, n = (_class_of(feats[k], cfg) for k in ("anchor", "positive", "negative"))
    assert (a == p).all() and (a != n).all()
    assert labels.shape == (500,) and not labels.any()


def test_multiview_views_disagree_and_combining_them_helps() -> None:
    cfg = _cfg("multiview", train_examples=3000, eval_examples=1000, num_views=3)
    (tr, ytr), (ev, yev) = load_arrays(cfg, "train"), load_arrays(cfg, "eval")
    assert sorted(tr) == ["view0", "view1", "view2"] and ytr.dtype == np.int32
    assert not np.allclose(ev["view0"], ev["view1"])

    def nearest_centroid_accuracy(x_train, x_eval) -> float:
        x_train, x_eval = x_train.reshape(len(x_train), -1), x_eval.reshape(len(x_eval), -1)
        centroids = np.stack([x_train[ytr == c].mean(0) for c in range(10)])
        dist = ((x_eval[:, None, :] - centroids[None]) ** 2).sum(-1)
        return float((dist.argmin(1) == yev).mean())

    one = nearest_centroid_accuracy(tr["view0"], ev["view0"])
    combined = nearest_centroid_accuracy(
        np.concatenate([tr[k] for k in sorted(tr)], -1),
        np.concatenate([ev[k] for k in sorted(ev)], -1),
    )
    assert 0.1 < one < combined, (one, combined)


def test_two_tower_synthetic_has_the_planted_structure() -> None:
    cfg = _cfg("two_tower", train_examples=4000)
    s = cfg.synthetic
    feats, labels = load_arrays(cfg, "train")
    item_cluster, _, _, _, prefs, histories = two_tower_world(cfg)
    users, items = feats["query_user"], feats["candidate_item"]
    relevant = np.array([item_cluster[i] in prefs[u] for u, i in zip(users, items, strict=True)])
    np.testing.assert_array_equal(relevant, labels == 1.0)
    assert abs(labels.mean() - s.positive_fraction) < 0.05
    # Histories come from the user's preferred clusters.
    assert all(set(item_cluster[histories[u]]) <= set(prefs[u]) for u in range(s.num_users))
    np.testing.assert_array_equal(feats["query_history"], histories[users])
    # Zipf popularity: the most frequent items are far more frequent than the median one.
    counts = np.sort(np.bincount(items, minlength=s.num_items))[::-1]
    assert counts[0] > 8 * max(1, np.median(counts))
    assert all(v.dtype == np.int32 for v in feats.values())


@pytest.mark.parametrize("family", ["siamese", "triplet", "multiview", "two_tower"])
def test_input_specs_match_the_arrays_and_the_contract(family: str) -> None:
    cfg = _cfg(family)
    specs = input_specs(cfg)
    feats, labels = load_arrays(cfg, "eval")
    assert list(specs) == get_family(family).streams(cfg)
    for name, spec in specs.items():
        assert tuple(spec.shape) == feats[name].shape[1:]
        assert spec.dtype.as_numpy_dtype == feats[name].dtype
    assert labels.ndim == 1


def test_random_source_has_the_requested_shapes() -> None:
    cfg = _cfg(
        "multiview",
        source="random",
        num_views=2,
        random={"num_examples": 32, "image_shape": [16, 16, 3]},
    )
    feats, labels = load_arrays(cfg, "train")
    assert sorted(feats) == ["view0", "view1"] and feats["view0"].shape == (32, 16, 16, 3)
    assert tuple(input_specs(cfg)["view1"].shape) == (16, 16, 3)


def test_sharded_per_replica_batches_make_up_the_global_batch() -> None:
    """The union of the replicas' batches at step k is the single-process global batch k."""
    import tensorflow as tf

    cfg = _cfg("siamese", train_examples=256)
    fn = make_dataset_fn(cfg, "train", global_batch_size=16, seed=3)
    whole = [b for _, b in zip(range(3), fn(None), strict=False)]
    shards = [
        [b for _, b in zip(range(3), fn(tf.distribute.InputContext(2, i, 2)), strict=False)]
        for i in range(2)
    ]
    for step in range(3):
        global_labels, global_left = whole[step][1].numpy(), whole[step][0]["left"].numpy()
        assert global_left.shape[0] == 16
        parts = [shards[i][step] for i in range(2)]
        assert all(p[0]["left"].shape[0] == 8 for p in parts)
        union = np.concatenate([p[0]["left"].numpy() for p in parts])
        key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
        assert key(union) == key(global_left)
        assert sorted(np.concatenate([p[1].numpy() for p in parts])) == sorted(global_labels)


def test_eval_split_is_seen_exactly_once_across_shards() -> None:
    import tensorflow as tf

    cfg = _cfg("siamese", eval_examples=50)
    fn = make_dataset_fn(cfg, "eval", global_batch_size=8, seed=0)
    sizes = [
        sum(int(b[1].shape[0]) for b in fn(tf.distribute.InputContext(2, i, 2))) for i in range(2)
    ]
    assert sum(sizes) == 50


def test_npz_files_bring_your_own_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.npz"
    np.savez(
        path,
        left=rng.random((40, 5, 5, 2)),
        right=rng.random((40, 5, 5, 2)),
        labels=rng.integers(0, 2, 40),
    )
    cfg = _cfg("siamese", source="npz", train_path=str(path), eval_fraction=0.25)
    assert tuple(input_specs(cfg)["left"].shape) == (5, 5, 2)
    (tr, ytr), (_ev, yev) = load_arrays(cfg, "train"), load_arrays(cfg, "eval")
    assert (len(ytr), len(yev)) == (30, 10) and tr["left"].dtype == np.float32


def test_npz_stream_mismatch_names_the_key_and_the_streams(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "views.npz"
    np.savez(path, **{f"view{i}": rng.random((10, 8, 8, 1)) for i in range(4)}, labels=np.zeros(10))
    cfg = _cfg("multiview", source="npz", train_path=str(path), num_views=3)
    with pytest.raises(ConfigError) as info:
        stream_shapes(cfg)
    assert info.value.path == "data.num_views"
    assert "view3" in str(info.value) and "['view0', 'view1', 'view2']" in str(info.value)

    bad = tmp_path / "pairs.npz"
    np.savez(bad, left=np.zeros((4, 3)), other=np.zeros((4, 3)), labels=np.zeros(4))
    with pytest.raises(ConfigError) as info:
        stream_shapes(_cfg("siamese", source="npz", train_path=str(bad)))
    assert (
        info.value.path == "data.train_path"
        and "'other'" in str(info.value)
        and "'right'" in str(info.value)
    )

    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, left=np.zeros((4, 3)), right=np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="no 'labels'"):
        stream_shapes(_cfg("siamese", source="npz", train_path=str(nolabels)))

    short = tmp_path / "short.npz"
    np.savez(short, left=np.zeros((4, 3)), right=np.zeros((3, 3)), labels=np.zeros(4))
    with pytest.raises(DataError, match="'right' has 3 examples"):
        stream_shapes(_cfg("siamese", source="npz", train_path=str(short)))

    with pytest.raises(ConfigError) as info:
        stream_shapes(_cfg("siamese", source="npz", train_path=str(tmp_path / "nope.npz")))
    assert info.value.path == "data.train_path"


def test_a_global_batch_larger_than_the_data_is_a_config_error() -> None:
    cfg = _cfg("siamese", train_examples=8)
    with pytest.raises(ConfigError) as info:
        make_dataset_fn(cfg, "train", global_batch_size=16, seed=0)
    assert info.value.path == "training.batch_size"


@pytest.mark.parametrize(
    ("family", "labels", "words"),
    [
        ("siamese", np.array([-5.0, 0.0, 1.0, 22.0]), ["0 or 1", "-5.0", "22.0"]),
        ("siamese", np.array(["same", "diff", "same", "diff"]), ["dtype <U4", "0 or 1"]),
        ("multiview", np.array([0.0, 1.5, 2.0, 3.0]), ["integer classes"]),
    ],
)
def test_npz_labels_that_cannot_be_the_familys_are_refused(
    tmp_path: Path, family: str, labels: np.ndarray, words: list[str]
) -> None:
    """Labels out of range would train silently on a meaningless loss; strings would crash deep
    in TensorFlow. Both are refused up front, naming the key and the file."""
    path = tmp_path / "bad.npz"
    streams = get_family(family).streams(validate({"model": {"family": family}}).data)
    np.savez(path, **{s: np.zeros((4, 8, 8, 1)) for s in streams}, labels=labels)
    with pytest.raises(ConfigError) as info:
        stream_shapes(_cfg(family, source="npz", train_path=str(path)))
    assert info.value.path.startswith("data.train_path") and str(path) in str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)
