"""SharedTower: every sharing mode computes what per-stream copies of the weights would.

The reference for every mode is a `separate` tower applied stream by stream (no folding) whose
per-stream weight sets are copies of the set the tower under test uses for that stream. Sharing
is then correct exactly when each shared variable's gradient is the sum of its copies'
gradients, and the outputs agree.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from keras.src.testing import TestCase

from dist_share.errors import ConfigError
from dist_share.model.blocks.build import build_block
from dist_share.model.towers import SharedTower

N = 3
B = 4
GROUPS = [[0, 2], [1]]
BLOCKS = {
    "mlp": ({"type": "mlp", "units": [6, 5], "norm": "batch"}, (B, 7), "float32"),
    "conv2d": (
        {
            "type": "conv2d",
            "filters": [3, 4],
            "kernel_size": 3,
            "pool_size": 2,
            "norm": "batch",
            "dense": [6],
        },
        (B, 8, 8, 2),
        "float32",
    ),
    "embedding": (
        {
            "type": "embedding",
            "vocab_size": 20,
            "embedding_dim": 4,
            "combiner": "mean",
            "units": [5],
        },
        (B, 3),
        "int32",
    ),
    "gru": ({"type": "gru", "units": 5}, (B, 4, 3), "float32"),
    "transformer": ({"type": "transformer", "units": 4, "num_heads": 2}, (B, 4, 3), "float32"),
}
OUT_DIM = 4


def _streams(shape: tuple, dtype: str, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        return [tf.constant(rng.integers(0, 20, shape), tf.int32) for _ in range(N)]
    return [tf.constant(rng.normal(size=shape), tf.float32) for _ in range(N)]


def _set_of(tower: SharedTower, stream: int, use_shared: bool) -> int:
    """Index of the weight set that `tower` uses for `stream`."""
    if tower.sharing == "shared":
        return 0
    if tower.sharing == "separate":
        return stream
    if tower.sharing == "grouped":
        return next(g for g, members in enumerate(tower.groups) if stream in members)
    return 0 if use_shared else 1 + stream


def _loss(outs: list, coeffs: list) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(o * c) for o, c in zip(outs, coeffs, strict=True)])


def _dense(g):
    return tf.zeros(()) if g is None else tf.convert_to_tensor(g)


def _close(actual, desired, msg: str = "") -> None:
    """float32 tolerance, scaled to the tensor's magnitude (conv gradients sum many terms)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=2e-5 * scale, err_msg=msg)


def _count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.mark.parametrize("block_name", sorted(BLOCKS))
@pytest.mark.parametrize("sharing", ["shared", "separate", "grouped", "switchable"])
def test_gradients_equal_sum_over_per_stream_copies(sharing: str, block_name: str) -> None:
    spec, shape, dtype = BLOCKS[block_name]
    keras.utils.set_random_seed(1)
    tower = SharedTower(
        spec, N, sharing, groups=GROUPS if sharing == "grouped" else None, output_dim=OUT_DIM
    )
    ref = SharedTower(spec, N, "separate", fold=False, output_dim=OUT_DIM)
    xs = _streams(shape, dtype)
    tower(xs)
    ref(xs)

    single = build_block(spec, OUT_DIM)
    single(xs[0])
    per_set = _count(single.trainable_weights)
    factor = {"shared": 1, "separate": N, "grouped": len(GROUPS), "switchable": 1 + N}[sharing]
    assert _count(tower.trainable_weights) == factor * per_set
    assert tower.num_weight_sets == factor

    rng = np.random.default_rng(2)
    coeffs = [tf.constant(rng.normal(size=(B, OUT_DIM)), tf.float32) for _ in range(N)]
    for use_shared in [True, False] if sharing == "switchable" else [True]:
        for i in range(N):
            ref.blocks[i].set_weights(tower.blocks[_set_of(tower, i, use_shared)].get_weights())
        flag = tf.Variable(use_shared)
        with tf.GradientTape(persistent=True) as tape:
            outs = tower(xs, training=True, use_shared=flag)
            loss = _loss(outs, coeffs)
            ref_outs = ref(xs, training=True)
            ref_loss = _loss(ref_outs, coeffs)
        for o, r in zip(outs, ref_outs, strict=True):
            np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-5, atol=1e-5)
        ref_grads = [
            [_dense(g) for g in tape.gradient(ref_loss, ref.blocks[i].trainable_weights)]
            for i in range(N)
        ]
        for s, block in enumerate(tower.blocks):
            grads = [_dense(g) for g in tape.gradient(loss, block.trainable_weights)]
            users = [i for i in range(N) if _set_of(tower, i, use_shared) == s]
            for j, (g, w) in enumerate(zip(grads, block.trainable_weights, strict=True)):
                expected = sum((ref_grads[i][j] for i in users), tf.zeros(w.shape))
                _close(
                    (g + tf.zeros(w.shape)).numpy(),
                    expected.numpy(),
                    f"set {block.name} variable {w.path} (streams {users})",
                )
                if not users:
                    assert float(tf.reduce_max(tf.abs(g))) == 0.0


@pytest.mark.parametrize("block_name", ["mlp", "conv2d"])
@pytest.mark.parametrize("sharing", ["shared", "grouped"])
@pytest.mark.parametrize("stacked", [False, True])
def test_folded_equals_per_stream_with_batch_norm(
    sharing: str, block_name: str, stacked: bool
) -> None:
    """Folding changes nothing: outputs, gradients and moving statistics all agree."""
    spec, shape, dtype = BLOCKS[block_name]
    groups = GROUPS if sharing == "grouped" else None
    folded = SharedTower(spec, N, sharing, groups=groups, fold=True, output_dim=OUT_DIM)
    plain = SharedTower(spec, N, sharing, groups=groups, fold=False, output_dim=OUT_DIM)
    xs = _streams(shape, dtype, seed=3)
    inp = tf.stack(xs, axis=1) if stacked else xs
    folded(inp)
    plain(inp)
    plain.set_weights(folded.get_weights())
    coeffs = [
        tf.constant(np.random.default_rng(i).normal(size=(B, OUT_DIM)), tf.float32)
        for i in range(N)
    ]

    def run(tower):
        with tf.GradientTape() as tape:
            out = tower(inp, training=True)
            outs = tf.unstack(out, axis=1) if stacked else out
            loss = _loss(outs, coeffs)
        return outs, tape.gradient(loss, tower.trainable_weights)

    f_out, f_grads = run(folded)
    p_out, p_grads = run(plain)
    for a, b in zip(f_out, p_out, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(f_grads, p_grads, strict=True):
        _close(a.numpy(), b.numpy())
    for a, b in zip(folded.non_trainable_weights, plain.non_trainable_weights, strict=True):
        assert "moving" in a.path
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    # The moving statistics did move (so the comparison above means something).
    assert not np.allclose(folded.non_trainable_weights[0].numpy(), 0.0)


def test_naive_batch_norm_would_differ_under_folding() -> None:
    """Guard for the test above: with streams of different scale, mixed statistics differ."""
    spec = {"type": "mlp", "units": [6], "norm": "batch"}
    tower = SharedTower(spec, 2, "shared")
    xs = [tf.random.normal((B, 5)), 10.0 + 5.0 * tf.random.normal((B, 5))]
    tower(xs)
    block = tower.blocks[0]
    per_stream = tower(xs, training=True)
    mixed = block(tf.concat(xs, 0), training=True)  # num_streams=1: one statistic for both
    assert not np.allclose(tf.concat(per_stream, 0).numpy(), mixed.numpy(), atol=1e-3)


@pytest.mark.parametrize(
    ("external", "jit"),
    [(False, False), (True, False), (False, True)],
    ids=["own", "external", "xla"],
)
def test_switchable_flip_without_retracing(external: bool, jit: bool) -> None:
    tower = SharedTower({"type": "mlp", "units": [5]}, 2, "switchable", output_dim=3)
    xs = [tf.random.normal((B, 4)), tf.random.normal((B, 4))]
    tower(xs)
    flag = tf.Variable(True) if external else tower.use_shared
    opt = keras.optimizers.SGD(0.1)
    opt.build(tower.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(a, b):
        with tf.GradientTape() as tape:
            outs = tower([a, b], training=True, use_shared=flag if external else None)
            loss = tf.reduce_mean(tf.square(outs[0] - 1.0)) + tf.reduce_mean(
                tf.square(outs[1] + 1.0)
            )
        grads = tape.gradient(loss, tower.trainable_variables)
        opt.apply(grads, tower.trainable_variables)
        return loss

    def moved_sets() -> list[bool]:
        before = [[w.numpy().copy() for w in b.trainable_weights] for b in tower.blocks]
        step(*xs)
        return [
            any(
                not np.array_equal(v0, w.numpy())
                for v0, w in zip(b0, b.trainable_weights, strict=True)
            )
            for b0, b in zip(before, tower.blocks, strict=True)
        ]

    assert moved_sets() == [True, False, False]
    flag.assign(False)
    assert moved_sets() == [False, True, True]
    flag.assign(True)
    assert moved_sets() == [True, False, False]
    assert step.experimental_get_tracing_count() == 1


def test_switchable_python_bool_and_stacked_input() -> None:
    tower = SharedTower({"type": "mlp", "units": [5]}, 3, "switchable", use_shared=False)
    x = tf.random.normal((B, 3, 4))
    y_flag = tower(x)  # the variable, initialised from use_shared=False
    y_sep = tower(x, use_shared=False)
    y_shared = tower(x, use_shared=True)
    assert y_flag.shape == (B, 3, 5)
    np.testing.assert_allclose(y_flag.numpy(), y_sep.numpy())
    np.testing.assert_allclose(
        y_shared.numpy(),
        tf.stack(tower.blocks[0](tf.reshape(x, (-1, 4))).numpy().reshape(B, 3, 5)).numpy(),
        rtol=1e-6,
    )


def test_grouped_stacked_equals_list() -> None:
    tower = SharedTower({"type": "mlp", "units": [5]}, 3, "grouped", groups=[[2, 0], [1]])
    xs = [tf.random.normal((B, 4)) for _ in range(3)]
    a = tower(xs)
    b = tower(tf.stack(xs, 1))
    np.testing.assert_allclose(tf.stack(a, 1).numpy(), b.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"sharing": "mirrored"}, "model.tower.sharing"),
        ({"sharing": "grouped", "groups": [[0], [1]]}, "model.tower.groups"),
        ({"sharing": "grouped", "groups": [[0, 1], [1, 2]]}, "model.tower.groups[1]"),
        ({"sharing": "grouped", "groups": [[0, 1], [5, 2]]}, "model.tower.groups[1]"),
        ({"sharing": "shared", "groups": [[0, 1, 2]]}, "model.tower.groups"),
        ({"block": {"type": "lstm"}}, "model.tower.block.type"),
    ],
)
def test_bad_config_raises_config_error(kwargs: dict, path: str) -> None:
    kwargs = {"block": {"type": "mlp", "units": [4]}, "num_streams": 3, **kwargs}
    with pytest.raises(ConfigError) as err:
        SharedTower(**kwargs)
    assert err.value.path == path


def test_get_config_round_trip_and_save_load(tmp_path) -> None:
    tower = SharedTower(
        {"type": "conv2d", "filters": [3], "norm": "batch"},
        3,
        "grouped",
        groups=GROUPS,
        output_dim=4,
    )
    inputs = [keras.Input((8, 8, 1)) for _ in range(3)]
    model = keras.Model(inputs, tower(inputs))
    xs = [np.random.rand(2, 8, 8, 1).astype("float32") for _ in range(3)]
    clone = SharedTower.from_config(tower.get_config())
    assert clone.get_config() == tower.get_config()
    path = tmp_path / "tower.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(model.predict(xs, verbose=0), loaded.predict(xs, verbose=0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_switchable_flag_is_saved(tmp_path) -> None:
    inputs = keras.Input((2, 4))
    tower = SharedTower({"type": "mlp", "units": [3]}, 2, "switchable", name="tower")
    model = keras.Model(inputs, tower(inputs))
    tower.use_shared.assign(False)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert bool(loaded.get_layer("tower").use_shared.numpy()) is False
    x = np.random.rand(3, 2, 4).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-6)


# sharing -> arguments of Keras's own layer harness for a SharedTower of stacked streams.
LAYER_CASES = {
    "shared": dict(
        init_kwargs={
            "block": {"type": "mlp", "units": [5], "norm": "batch"},
            "num_streams": 3,
            "output_dim": 4,
        },
        input_shape=(2, 3, 6),
        expected_output_shape=(2, 3, 4),
        expected_num_trainable_weights=6,
        expected_num_non_trainable_weights=2,
    ),
    "grouped": dict(
        init_kwargs={
            "block": {"type": "mlp", "units": [5]},
            "num_streams": 3,
            "sharing": "grouped",
            "groups": GROUPS,
        },
        input_shape=(2, 3, 6),
        expected_output_shape=(2, 3, 5),
        expected_num_trainable_weights=4,
    ),
    "switchable": dict(
        init_kwargs={
            "block": {"type": "mlp", "units": [5]},
            "num_streams": 2,
            "sharing": "switchable",
        },
        input_shape=(2, 2, 6),
        expected_output_shape=(2, 2, 5),
        expected_num_trainable_weights=6,
        expected_num_non_trainable_weights=1,
    ),
}


class SharedTowerLayerTest(TestCase):
    """Keras's own layer harness: build, serialization, training in a model, symbolic call."""

    @parameterized.named_parameters(*LAYER_CASES.items())
    def test_stacked(self, harness: dict) -> None:
        self.run_layer_test(SharedTower, **harness)


def test_mixed_precision_tower_runs_in_float16() -> None:
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        tower = SharedTower(
            {"type": "conv2d", "filters": [3], "norm": "batch"}, 2, "shared", output_dim=4
        )
        x = tf.random.normal((B, 2, 8, 8, 1))
        y = tower(x, training=True)
        assert y.dtype == tf.float16
        assert tower.blocks[0].trainable_weights[0].dtype == "float32"
        assert np.isfinite(y.numpy().astype("float32")).all()
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
