"""Model families from config: validation, fit, save/load, determinism, mixed precision, strategy."""

from __future__ import annotations

import copy
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.testing import TestCase

from dist_share.config.schema import FAMILIES
from dist_share.errors import ConfigError
from dist_share.families.build import ModelSpec, build_model
from dist_share.model import heads, losses, metrics
from dist_share.run.resolve import parse_model
from tests.helpers import train_jobs

IMG = tf.TensorSpec([8, 8, 1], tf.float32)
CONV = {
    "type": "conv2d",
    "filters": [4, 8],
    "kernel_size": 3,
    "pool_size": 2,
    "norm": "batch",
    "dense": [16],
}
TWO_TOWER_SPECS = {
    "query_user": tf.TensorSpec([], tf.int32),
    "query_history": tf.TensorSpec([5], tf.int32),
    "candidate_item": tf.TensorSpec([], tf.int32),
}
CASES = {
    "siamese": (
        {
            "family": "siamese",
            "tower": {"sharing": "shared", "block": CONV},
            "embedding_dim": 8,
            "head": "l2",
        },
        {"left": IMG, "right": IMG},
    ),
    "triplet": (
        {
            "family": "triplet",
            "tower": {"sharing": "switchable", "block": {"type": "mlp", "units": [16]}},
            "embedding_dim": 8,
        },
        {"anchor": IMG, "positive": IMG, "negative": IMG},
    ),
    "multiview": (
        {
            "family": "multiview",
            "tower": {"sharing": "grouped", "groups": [[0, 2], [1]], "block": CONV},
            "embedding_dim": 8,
            "head": "concat",
            "num_classes": 10,
            "loss": {"type": "sparse_categorical_crossentropy"},
        },
        {"view0": IMG, "view1": IMG, "view2": IMG},
    ),
    "two_tower": (
        {
            "family": "two_tower",
            "embedding_dim": 8,
            "tables": {"users": {"vocab_size": 30}, "items": {"vocab_size": 40}},
            "query": {
                "features": {"query_user": "users", "query_history": "items"},
                "combiner": "mean",
                "block": {"type": "mlp", "units": [16]},
            },
            "candidate": {
                "features": {"candidate_item": "items"},
                "block": {"type": "mlp", "units": [16]},
            },
            "loss": {"type": "in_batch_softmax"},
        },
        TWO_TOWER_SPECS,
    ),
}


def _batch(family: str, specs: dict, n: int = 16, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = {}
    for name, spec in specs.items():
        shape = [n, *spec.shape.as_list()]
        x[name] = (
            rng.integers(0, 30, shape).astype("int32")
            if spec.dtype == tf.int32
            else rng.random(shape).astype("float32")
        )
    y = {
        "siamese": rng.integers(0, 2, n).astype("float32"),
        "triplet": np.zeros(n, "float32"),
        "multiview": rng.integers(0, 10, n).astype("int32"),
        "two_tower": np.ones(n, "float32"),
    }[family]
    return x, y


def test_families_constant() -> None:
    assert FAMILIES == ("siamese", "triplet", "multiview", "two_tower")
    assert set(CASES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_then_save_load_round_trip(family: str, tmp_path: Path) -> None:
    cfg, specs = CASES[family]
    spec = build_model(parse_model(cfg), specs)
    assert isinstance(spec, ModelSpec)
    assert sorted(spec.model.input.keys()) == sorted(specs) == sorted(spec.stream_names)
    x, y = _batch(family, specs)
    loss = spec.loss(y, spec.model(x))
    assert loss.shape == (16,) and loss.dtype == tf.float32
    for name, metric in spec.metrics.items():
        assert metric(y, spec.model(x)).shape == (16,), name
    before = [w.numpy().copy() for w in spec.model.trainable_weights]
    spec.model.compile(
        optimizer=keras.optimizers.SGD(0.05), loss=spec.loss, metrics=list(spec.metrics.values())
    )
    history = spec.model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(
        not np.array_equal(b, w.numpy())
        for b, w in zip(before, spec.model.trainable_weights, strict=True)
    )
    path = tmp_path / f"{family}.keras"
    spec.model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        spec.model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_two_tower_shares_item_table_between_towers() -> None:
    cfg, specs = CASES["two_tower"]
    model = build_model(parse_model(cfg), specs).model
    tables = [w for w in model.trainable_weights if "table_" in w.path]
    assert sorted(w.shape[0] for w in tables) == [30, 40]  # one users, one items: not duplicated
    items = model.get_layer("table_items")
    x, y = _batch("two_tower", specs)
    with tf.GradientTape() as tape:
        out = model(x)
        q_loss = tf.reduce_sum(out[:, 0])
    grad = tf.convert_to_tensor(tape.gradient(q_loss, items.embeddings))
    touched = np.unique(x["query_history"])
    assert np.abs(grad.numpy()[touched]).sum() > 0  # the query tower reads the shared item table


def test_build_is_deterministic_under_set_random_seed() -> None:
    cfg, specs = CASES["multiview"]
    weights = []
    for _ in range(2):
        keras.utils.set_random_seed(42)
        weights.append([w.numpy() for w in build_model(parse_model(cfg), specs).model.weights])
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_switchable_model_param_count_and_flag() -> None:
    cfg, specs = CASES["triplet"]
    model = build_model(parse_model(cfg), specs).model
    tower = model.get_layer("tower")
    per_set = sum(int(np.prod(w.shape)) for w in tower.blocks[0].trainable_weights)
    assert sum(int(np.prod(w.shape)) for w in tower.trainable_weights) == 4 * per_set
    x, _ = _batch("triplet", specs)
    shared = model.predict(x, verbose=0)
    tower.use_shared.assign(False)
    assert not np.allclose(shared, model.predict(x, verbose=0))


def test_mixed_precision_distances_and_losses_are_float32() -> None:
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        for family in FAMILIES:
            cfg, specs = CASES[family]
            spec = build_model(parse_model(cfg), specs)
            x, y = _batch(family, specs)
            out = spec.model(x, training=True)
            assert out.dtype == tf.float32, family
            assert spec.loss(y, out).dtype == tf.float32, family
        cfg, specs = CASES["siamese"]
        spec = build_model(parse_model(cfg), specs)
        assert spec.model.get_layer("tower").compute_dtype == "float16"
        spec.model.compile(optimizer="sgd", loss=spec.loss)
        x, y = _batch("siamese", specs)
        assert np.isfinite(spec.model.fit(x, y, batch_size=8, verbose=0).history["loss"]).all()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _mutate(family: str, fn) -> tuple[dict, dict]:
    cfg, specs = CASES[family]
    cfg, specs = copy.deepcopy(cfg), dict(specs)
    fn(cfg, specs)
    return cfg, specs


BAD = [
    ("missing stream", _mutate("siamese", lambda c, s: s.pop("right")), "stream right", "missing"),
    ("extra stream", _mutate("siamese", lambda c, s: s.update(extra=IMG)), "stream extra", "extra"),
    (
        "rank",
        _mutate(
            "siamese",
            lambda c, s: s.update(
                left=tf.TensorSpec([64], tf.float32), right=tf.TensorSpec([64], tf.float32)
            ),
        ),
        "stream left",
        "height, width",
    ),
    (
        "shapes differ",
        _mutate("siamese", lambda c, s: s.update(right=tf.TensorSpec([16, 16, 1], tf.float32))),
        "stream right",
        "share weights",
    ),
    (
        "sharing",
        _mutate("siamese", lambda c, s: c["tower"].update(sharing="tied")),
        "model.tower.sharing",
        "'tied', expected one of shared",
    ),
    (
        "groups",
        _mutate("multiview", lambda c, s: c["tower"].update(groups=[[0], [1]])),
        "model.tower.groups",
        "partition",
    ),
    (
        "groups dup",
        _mutate("multiview", lambda c, s: c["tower"].update(groups=[[0, 1], [1, 2]])),
        "model.tower.groups[1]",
        "already",
    ),
    (
        "groups unused",
        _mutate("siamese", lambda c, s: c["tower"].update(groups=[[0, 1]])),
        "model.tower.groups",
        "only",
    ),
    (
        "family",
        _mutate("siamese", lambda c, s: c.update(family="gan")),
        "model.family",
        "'gan', expected one of siamese",
    ),
    (
        "head",
        _mutate("siamese", lambda c, s: c.update(head="concat")),
        "model.head",
        "'concat', expected one of l2, cosine",
    ),
    (
        "loss",
        _mutate("siamese", lambda c, s: c.update(loss={"type": "triplet"})),
        "model.loss.type",
        "'triplet', expected one of contrastive",
    ),
    (
        "loss opt",
        _mutate("siamese", lambda c, s: c.update(loss={"type": "contrastive", "alpha": 1})),
        "model.loss.alpha",
        "unknown option",
    ),
    (
        "block",
        _mutate("siamese", lambda c, s: c["tower"].update(block={"type": "vit"})),
        "model.tower.block.type",
        "unknown block",
    ),
    (
        "key",
        _mutate("siamese", lambda c, s: c["tower"].update(shard=True)),
        "model.tower.shard",
        "unknown key",
    ),
    ("view gap", _mutate("multiview", lambda c, s: s.pop("view1")), "stream view1", "without gaps"),
    (
        "table",
        _mutate("two_tower", lambda c, s: c["query"]["features"].update(query_user="people")),
        "model.query.features.query_user",
        "unknown table",
    ),
    (
        "tt missing",
        _mutate("two_tower", lambda c, s: s.pop("candidate_item")),
        "stream candidate_item",
        "missing",
    ),
    (
        "tt extra",
        _mutate("two_tower", lambda c, s: s.update(other=tf.TensorSpec([], tf.int32))),
        "stream other",
        "extra",
    ),
    (
        "tt dtype",
        _mutate("two_tower", lambda c, s: s.update(query_user=tf.TensorSpec([], tf.float32))),
        "stream query_user",
        "integer",
    ),
    (
        "dim",
        _mutate("siamese", lambda c, s: c.update(embedding_dim=0)),
        "model.embedding_dim",
        "got 0, expected an integer > 0",
    ),
]


@pytest.mark.parametrize(
    ("cfg_specs", "path", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_config_raises_config_error_naming_path(cfg_specs, path: str, match: str) -> None:
    cfg, specs = cfg_specs
    with pytest.raises(ConfigError, match=match) as err:
        build_model(parse_model(cfg), specs)
    assert err.value.path == path


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_inside_mirrored_strategy_scope() -> None:
    """Keras fit of every family inside the MirroredStrategy scope of the session's shared
    mirrored launch (tests/workers/towers_mirrored.py, run by tests/helpers/train_jobs.py)."""
    (result,) = train_jobs.check("mirrored", "model_families")
    assert result["num_replicas"] == 2
    for family in FAMILIES:
        r = result[family]
        assert all(np.isfinite(r["losses"])), family
        assert r["moved"], family
    # Switchable flag flipped under the strategy: the other weight sets moved.
    assert result["switch"] == {
        "shared_moved_first": True,
        "streams_moved_first": False,
        "shared_moved_second": False,
        "streams_moved_second": True,
    }


def test_losses_match_their_formulas() -> None:
    rng = np.random.default_rng(0)
    d = rng.random(6).astype("float32") * 2
    y = np.array([1, 0, 1, 0, 1, 0], "float32")
    np.testing.assert_allclose(
        losses.ContrastiveLoss(1.0)(y, d).numpy(),
        y * d**2 + (1 - y) * np.maximum(1.0 - d, 0) ** 2,
        rtol=1e-6,
    )
    dd = rng.random((6, 2)).astype("float32")
    np.testing.assert_allclose(
        losses.TripletLoss(0.3)(y, dd).numpy(), np.maximum(dd[:, 0] - dd[:, 1] + 0.3, 0), rtol=1e-6
    )
    np.testing.assert_array_equal(metrics.TripletAccuracy()(y, dd).numpy(), dd[:, 0] < dd[:, 1])
    pair = rng.normal(size=(6, 2, 3)).astype("float32")
    logits = pair[:, 0] @ pair[:, 1].T / 0.5
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(
        losses.InBatchSoftmaxLoss(0.5)(y, pair).numpy(), -np.diag(log_softmax), rtol=1e-5
    )
    np.testing.assert_array_equal(
        metrics.InBatchTop1()(y, pair).numpy(),
        (pair[:, 0] @ pair[:, 1].T).argmax(1) == np.arange(6),
    )
    score = (pair[:, 0] * pair[:, 1]).sum(-1)
    bce = np.maximum(score, 0) - score * y + np.log1p(np.exp(-np.abs(score)))
    np.testing.assert_allclose(losses.BinaryLoss()(y, pair).numpy(), bce, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        metrics.BinaryAccuracy()(y, pair).numpy(), (score > 0) == (y > 0.5)
    )
    cls = rng.normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 1, 2, 3, 0, 1])
    ls = cls - np.log(np.exp(cls).sum(1, keepdims=True))
    np.testing.assert_allclose(
        losses.SparseCrossEntropyLoss()(labels, cls).numpy(), -ls[np.arange(6), labels], rtol=1e-5
    )
    np.testing.assert_array_equal(
        metrics.ClassAccuracy()(labels, cls).numpy(), cls.argmax(1) == labels
    )
    np.testing.assert_array_equal(metrics.PairAccuracy(0.5)(y, d).numpy(), (d < 0.5) == (y > 0.5))
    # Mixed-precision predictions come back as float32 per-example values.
    assert losses.ContrastiveLoss()(y, tf.cast(d, tf.float16)).dtype == tf.float32


def test_heads_match_numpy() -> None:
    rng = np.random.default_rng(1)
    a, b, c = (rng.normal(size=(4, 3)).astype("float32") for _ in range(3))
    np.testing.assert_allclose(
        heads.L2Distance()([a, b]).numpy(), np.linalg.norm(a - b, axis=1), rtol=1e-5
    )
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(heads.CosineSimilarity()([a, b]).numpy(), cos, rtol=1e-5)
    np.testing.assert_allclose(
        heads.CosineSimilarity(as_distance=True)([a, b]).numpy(), 1 - cos, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(heads.DotProduct()([a, b]).numpy(), (a * b).sum(1), rtol=1e-5)
    trip = heads.TripletDistances()([a, b, c]).numpy()
    np.testing.assert_allclose(trip[:, 1], np.linalg.norm(a - c, axis=1), rtol=1e-5)
    stacked = np.stack([a, b, c], 1)
    for mode, want in (
        ("concat", np.concatenate([a, b, c], 1)),
        ("sum", a + b + c),
        ("mean", (a + b + c) / 3),
    ):
        np.testing.assert_allclose(heads.Combine(mode)([a, b, c]).numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(heads.Combine(mode)(stacked).numpy(), want, rtol=1e-6)
    half = [tf.cast(a, tf.float16), tf.cast(b, tf.float16)]
    assert heads.L2Distance()(half).dtype == tf.float32


class HeadLayerTest(TestCase):
    def test_l2_distance(self) -> None:
        self.run_layer_test(
            heads.L2Distance,
            init_kwargs={},
            input_shape=[(2, 4), (2, 4)],
            expected_output_shape=(2,),
            run_training_check=False,  # no weights; the harness cannot feed list inputs to fit
            run_mixed_precision_check=False,  # float32 on purpose: see heads.py
        )

    def test_combine(self) -> None:
        self.run_layer_test(
            heads.Combine,
            init_kwargs={"mode": "concat"},
            input_shape=[(2, 4), (2, 4), (2, 4)],
            expected_output_shape=(2, 12),
            run_training_check=False,
        )
