"""Bring your own tower: Keras layers and models a user would write, shared across streams.

Four kinds of user tower, each over 2-3 streams: a Keras application (MobileNetV3Small,
weights=None, 32x32), a functional model with BatchNormalization and Dropout, a subclassed layer
with its own ``build`` (and a BatchNormalization inside), and a text encoder over token-id
streams (query and document). For each: the gradient of every shared variable is the sum of the
per-branch gradients, and the folded tower equals the per-stream one (outputs, gradients, and
every variable including the moving statistics after a training step). Then: what is refused
and how, cloning, factories, YAML block specs, save/load, fit and mixed precision.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from dist_share.errors import ConfigError
from dist_share.families import build as models
from dist_share.model.blocks.build import build_block
from dist_share.model.blocks.spec import validate_block_spec
from dist_share.model.folding import FoldedBatchNormalization, FoldingError
from dist_share.model.heads import L2Distance
from dist_share.model.towers import SharedTower
from dist_share.run.resolve import validate

B = 4
NOT_CALLABLE = 42  # a factory reference that names something that is not callable
ONE_DENSE = keras.layers.Dense(3)  # a bad factory returns this same object every time


# -- the user towers ------------------------------------------------------------------------------
def make_mobilenet() -> keras.Model:
    return keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, include_top=False, pooling="avg"
    )


def make_functional(dropout: float = 0.3) -> keras.Model:
    inputs = keras.Input((10,))
    x = keras.layers.Dense(16)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.8)(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(8)(x)
    return keras.Model(inputs, outputs, name="user_encoder")


@keras.saving.register_keras_serializable(package="test_user_towers")
class SensorEncoder(keras.layers.Layer):
    """A subclassed layer that creates its sub-layers and weights in its own ``build``."""

    def __init__(self, units: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape) -> None:
        self.conv = keras.layers.Conv1D(self.units, 3, padding="same", name="conv")
        self.conv.build(input_shape)
        self.norm = keras.layers.BatchNormalization(momentum=0.7, name="norm")
        self.norm.build(tuple(input_shape[:-1]) + (self.units,))
        self.mix = self.add_weight(shape=(self.units, self.units), name="mix")

    def call(self, x, training=None):
        h = ops.relu(self.norm(self.conv(x), training=training))
        return ops.matmul(ops.mean(h, axis=1), self.mix)

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


def make_sensor() -> SensorEncoder:
    return SensorEncoder(8)


def make_text_encoder(vocab: int = 50, dim: int = 16) -> keras.Model:
    ids = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(vocab, dim, mask_zero=True)(ids)
    attended = keras.layers.MultiHeadAttention(2, dim // 2)(x, x)
    x = keras.layers.LayerNormalization()(x + attended)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(8)(x), name="text_encoder")


def returns_a_dict() -> dict:
    return {"type": "mlp"}


def _images(seed: int, shape: tuple) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, shape), tf.float32)


def _tokens(seed: int) -> tf.Tensor:
    ids = np.random.default_rng(seed).integers(1, 50, (B, 6))
    ids[:, 4 + seed % 2 :] = 0  # padding, masked
    return tf.constant(ids, tf.int32)


# name -> (factory, number of streams, streams)
KINDS = {
    "mobilenet": (make_mobilenet, 2, lambda: [_images(i, (B, 32, 32, 3)) for i in range(2)]),
    "functional": (
        make_functional,
        3,
        lambda: [
            tf.constant(np.random.default_rng(i).normal(2.0 * i, 1.0 + i, (B, 10)), tf.float32)
            for i in range(3)
        ],
    ),
    "subclassed": (
        make_sensor,
        3,
        lambda: [
            tf.constant(np.random.default_rng(i).normal(i, 1.0, (B, 12, 3)), tf.float32)
            for i in range(3)
        ],
    ),
    "text": (make_text_encoder, 2, lambda: [_tokens(0), _tokens(1)]),  # query, document
}


def _no_dropout(layer) -> None:
    """Dropout draws random masks: a folded call draws one [N*B] mask, N calls draw N [B] masks,
    so they can only be compared draw-for-draw without it (test_dropout_under_folding covers it)."""
    for sub in layer._flatten_layers():
        if isinstance(sub, keras.layers.Dropout):
            sub.rate = 0.0


def _close(actual, desired, msg: str = "", scale: float | None = None) -> None:
    """float32 tolerance relative to `scale` (default: the tensor's own magnitude).

    Gradients are sums over the batch, space and channels, accumulated in another order when
    the batch is folded (the kernels pick their algorithm by batch size), so they agree to
    ~1e-5 of the gradients' magnitude, not of each entry: in a deep network a gradient that
    cancels out (a BatchNormalization beta whose output is normalised again) is pure rounding
    noise of the size of the largest gradient times float32's epsilon.
    """
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    if scale is None:
        scale = float(np.abs(desired).max(initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=5e-5 * max(1.0, scale), err_msg=msg)


def _scale(grads) -> float:
    """The largest gradient entry of a model: the magnitude its rounding noise is relative to."""
    return max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in grads)


def _coeffs(outs) -> list:
    return [
        tf.constant(np.random.default_rng(10 + i).normal(size=o.shape), tf.float32)
        for i, o in enumerate(outs)
    ]


def _loss(outs, coeffs):
    return tf.add_n(
        [tf.reduce_sum(tf.cast(o, tf.float32) * c) for o, c in zip(outs, coeffs, strict=True)]
    )


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shared_gradient_is_sum_of_per_branch_gradients(kind: str) -> None:
    """One shared weight set, folded, against N per-stream copies of it (no folding)."""
    factory, n, streams = KINDS[kind]
    keras.utils.set_random_seed(0)
    encoder = factory()
    tower = SharedTower(encoder, n)
    branches = SharedTower(factory, n, "separate", fold=False)
    xs = streams()
    tower(xs)
    branches(xs)
    assert tower.blocks[0] is encoder, "the instance is the shared weight set"
    for block in (*tower.blocks, *branches.blocks):
        _no_dropout(block)
    for copy in branches.blocks:
        copy.set_weights(encoder.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        outs = tower(xs, training=True)
        coeffs = _coeffs(outs)
        loss = _loss(outs, coeffs)
        ref_outs = branches(xs, training=True)
        ref_loss = _loss(ref_outs, coeffs)
    for o, r in zip(outs, ref_outs, strict=True):
        _close(o, r, f"{kind} output")
    shared = tape.gradient(loss, encoder.trainable_weights)
    per_branch = [tape.gradient(ref_loss, b.trainable_weights) for b in branches.blocks]
    assert len(shared) > 0
    scale = _scale(shared)
    for j, (g, w) in enumerate(zip(shared, encoder.trainable_weights, strict=True)):
        expected = tf.add_n([tf.convert_to_tensor(p[j]) for p in per_branch])
        _close(tf.convert_to_tensor(g), expected, f"{kind}: {w.path}", scale)
    # Every branch contributes (so dropping one would be caught).
    assert all(any(float(tf.reduce_max(tf.abs(g))) > 0 for g in p) for p in per_branch)


# MobileNet runs its step eagerly and with list input only: tracing its step takes minutes on a
# loaded 2-core machine, and the stacked path and tracing are the same code for every kind.
FOLD_CASES = [
    ("mobilenet", False, False),
    *[
        (k, stacked, True)
        for k in ("functional", "subclassed", "text")
        for stacked in (False, True)
    ],
]


@pytest.mark.parametrize(
    ("kind", "stacked", "compiled"),
    FOLD_CASES,
    ids=[f"{k}-{'stacked' if s else 'list'}" for k, s, _ in FOLD_CASES],
)
def test_folded_equals_unfolded_after_a_training_step(
    kind: str, stacked: bool, compiled: bool
) -> None:
    """Outputs, gradients, then every variable (moving statistics too) after one SGD step."""
    factory, n, streams = KINDS[kind]
    keras.utils.set_random_seed(1)
    folded = SharedTower(factory(), n, fold=True, output_dim=5)
    plain = SharedTower(factory(), n, fold=False, output_dim=5)
    xs = streams()
    inp = tf.stack(xs, axis=1) if stacked else xs
    folded(inp)
    plain(inp)
    for tower in (folded, plain):
        _no_dropout(tower.blocks[0])
    plain.set_weights(folded.get_weights())
    coeffs = _coeffs([tf.zeros((B, 5))] * n)

    def make_step(tower):
        def step(inp):
            with tf.GradientTape() as tape:
                out = tower(inp, training=True)
                outs = tf.unstack(out, axis=1) if stacked else out
                loss = _loss(outs, coeffs)
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, tower.trainable_weights)]
            for g, w in zip(grads, tower.trainable_weights, strict=True):
                w.assign_sub(0.01 * g)
            return outs, grads

        return tf.function(step) if compiled else step

    f_out, f_grads = make_step(folded)(inp)
    p_out, p_grads = make_step(plain)(inp)
    for a, b in zip(f_out, p_out, strict=True):
        _close(a, b, "output")
    scale = _scale(p_grads)
    for a, b, w in zip(f_grads, p_grads, folded.trainable_weights, strict=True):
        _close(a, b, f"gradient of {w.path}", scale)
    moving = 0
    for a, b in zip(folded.weights, plain.weights, strict=True):
        _close(a.numpy(), b.numpy(), f"after the step: {a.path}", 0.01 * scale)
        moving += "moving" in a.path
    if kind != "text":  # the text encoder has no batch statistics
        assert moving > 0 and folded.folded_layers, "BatchNormalization was converted"
        stat = next(w for w in folded.weights if "moving_mean" in w.path)
        assert not np.allclose(stat.numpy(), 0.0), "the moving statistics moved"


def test_dropout_under_folding_draws_independent_masks_per_stream() -> None:
    """Dropout is per element: folded, each stream still gets its own mask at the same rate."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((400,))
    encoder = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
    tower = SharedTower(encoder, 3)
    x = tf.ones((B, 400))
    outs = tower([x, x, x], training=True)
    masks = [o.numpy() > 0 for o in outs]
    for m in masks:
        assert 0.4 < m.mean() < 0.6
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    for o in tower([x, x, x], training=False):
        np.testing.assert_array_equal(o.numpy(), x.numpy())


def test_batch_norm_is_converted_in_place() -> None:
    encoder = make_functional()
    bn = encoder.layers[2]
    before = [w.numpy().copy() for w in bn.weights]
    tower = SharedTower(encoder, 3)
    tower([tf.zeros((B, 10))] * 3)
    assert encoder.layers[2] is bn and type(bn) is FoldedBatchNormalization
    assert isinstance(bn, keras.layers.BatchNormalization)
    assert bn.momentum == 0.8 and [w.numpy().tolist() for w in bn.weights] == [
        b.tolist() for b in before
    ]
    assert tower.folded_layers == ["user_encoder/batch_normalization"] or tower.folded_layers[
        0
    ].endswith(bn.name)
    # Not folded (separate, or fold=False): converted too, for statistics over every replica's
    # rows; a separate set is converted in the same way.
    other = make_functional()
    unfolded = SharedTower(other, 2, fold=False)
    unfolded([tf.zeros((B, 10))] * 2)
    assert type(other.layers[2]) is FoldedBatchNormalization and unfolded.folded_layers
    separate = SharedTower(make_functional, 2, "separate")
    separate([tf.zeros((B, 10))] * 2)
    assert all(type(b.layers[2]) is FoldedBatchNormalization for b in separate.blocks)
    # Outside a tower the converted layer is plain BatchNormalization.
    plain = keras.layers.BatchNormalization(momentum=0.8)
    x = tf.random.normal((B, 16))
    plain.build(x.shape)
    plain.set_weights(bn.get_weights())
    np.testing.assert_allclose(bn(x, training=True), plain(x, training=True), rtol=1e-6)


# -- refused --------------------------------------------------------------------------------------
class PooledBatchNorm(keras.layers.BatchNormalization):
    """A user's BatchNormalization subclass: its own call could do anything with the batch."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=training, mask=mask) * 2.0


def _batch_centered() -> keras.Model:
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4, name="dense")(inputs)
    outputs = x - ops.mean(x, axis=0, keepdims=True)  # uses the other examples of the batch
    return keras.Model(inputs, outputs, name="batch_centered")


@pytest.mark.parametrize(
    ("make", "named", "why"),
    [
        (
            lambda: keras.Sequential(
                [keras.Input((6,)), keras.layers.Dense(4), PooledBatchNorm(name="pooled_bn")],
                name="seq",
            ),
            "seq/pooled_bn",
            "subclasses BatchNormalization",
        ),
        (
            lambda: keras.Sequential(
                [keras.Input((6,)), keras.layers.Dropout(0.5, noise_shape=(1, 6), name="same_mask")]
            ),
            "same_mask",
            "one dropout mask for the whole batch",
        ),
        (_batch_centered, "batch_centered/mean", "axis 0, the batch axis"),
        (
            lambda: keras.Sequential(
                [keras.Input((6,), batch_size=4), keras.layers.Dense(3)], name="fixed"
            ),
            "fixed",
            "fixed batch size 4",
        ),
    ],
    ids=["bn_subclass", "batch_dropout_mask", "reduce_over_batch", "fixed_batch"],
)
def test_unfoldable_layer_is_refused_by_name(make, named: str, why: str) -> None:
    with pytest.raises(FoldingError, match=why) as err:
        SharedTower(make(), 2)([tf.zeros((4, 6))] * 2)
    message = str(err.value)
    assert named in message and "fold=False" in message
    assert err.value.path == "model.tower.block" and named in err.value.layer_path
    # The same model runs per stream with fold=False.
    outs = SharedTower(make(), 2, fold=False)([tf.zeros((4, 6))] * 2, training=True)
    assert len(outs) == 2


# -- weight sets: instances, clones, factories, lists ---------------------------------------------
def test_instance_is_cloned_with_fresh_weights_for_more_sets() -> None:
    encoder = make_functional()
    tower = SharedTower(encoder, 3, "switchable", use_shared=False)
    xs = [tf.random.normal((B, 10)) for _ in range(3)]
    tower(xs)
    assert tower.blocks[0] is encoder and tower.num_weight_sets == 4
    kernels = [b.trainable_weights[0].numpy() for b in tower.blocks]
    assert all(not np.array_equal(kernels[0], k) for k in kernels[1:]), "fresh weights"
    grouped = SharedTower(SensorEncoder(4), 3, "grouped", groups=[[0, 2], [1]])
    grouped([tf.random.normal((B, 5, 2))] * 3)
    assert isinstance(grouped.blocks[1], SensorEncoder) and grouped.blocks[1].units == 4


class Uncloneable(keras.layers.Layer):
    """Its constructor takes a layer, which get_config cannot return: it cannot be cloned."""

    def __init__(self, inner, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)


def test_uncloneable_instance_asks_for_a_factory() -> None:
    layer = Uncloneable(keras.layers.Dense(3), name="wrapped")
    SharedTower(layer, 2)([tf.zeros((B, 4))] * 2)  # one weight set: no clone needed
    with pytest.raises(ConfigError, match="factory") as err:
        SharedTower(Uncloneable(keras.layers.Dense(3), name="wrapped2"), 2, "separate")
    assert "wrapped2" in str(err.value) and err.value.path == "model.tower.block"
    tower = SharedTower(lambda: Uncloneable(keras.layers.Dense(3)), 2, "separate")
    outs = tower([tf.zeros((B, 4))] * 2)
    assert tower.num_weight_sets == 2 and outs[0].shape == (B, 3)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (lambda: "dense", "factory's return value .* must be a Keras layer"),
        (lambda: ONE_DENSE, "same layer object appears in two"),
        ([keras.layers.Dense(3)], "one layer per weight set"),
        ([keras.layers.Dense(3), "x"], "each entry must be a Keras layer"),
        (42, "must be a block spec"),
    ],
    ids=["not_a_layer", "same_object", "list_length", "list_entry", "not_a_block"],
)
def test_bad_user_block_is_named(block, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SharedTower(block, 2, "separate")


def test_list_of_layers_is_one_set_each() -> None:
    sets = [keras.layers.Dense(3, name=f"d{i}") for i in range(2)]
    tower = SharedTower(sets, 2, "separate")
    tower([tf.zeros((B, 4))] * 2)
    assert tower.blocks == sets


# -- YAML block specs: custom factories and Keras applications ------------------------------------
FACTORY_PATH = "model.tower.block.factory"


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("no_such_module_for_dist_share:make", "cannot import module 'no_such_module_for_dist"),
        (f"{__name__}:make_nothing", "has no attribute 'make_nothing'"),
        (f"{__name__}:NOT_CALLABLE", "is not callable .it is a int"),
        (__name__, "must be 'package.module:function'"),
    ],
    ids=["bad_module", "bad_attribute", "not_callable", "no_colon"],
)
def test_custom_factory_errors_name_the_key(factory: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        validate_block_spec({"type": "custom", "factory": factory})
    assert err.value.path == FACTORY_PATH


def test_custom_factory_wrong_return_type() -> None:
    spec = validate_block_spec({"type": "custom", "factory": f"{__name__}:returns_a_dict"})
    with pytest.raises(ConfigError, match="returned a dict, not a Keras layer") as err:
        SharedTower(spec, 2)
    assert err.value.path == FACTORY_PATH
    bad_args = {
        "type": "custom",
        "factory": f"{__name__}:make_text_encoder",
        "args": {"x": 1},
    }
    with pytest.raises(ConfigError, match="raised TypeError") as err:
        build_block(bad_args)
    assert err.value.path == FACTORY_PATH


def test_custom_factory_spec_builds_fresh_sets_and_round_trips(tmp_path) -> None:
    spec = {
        "type": "custom",
        "factory": f"{__name__}:make_text_encoder",
        "args": {"dim": 8},
    }
    tower = SharedTower(spec, 2, "grouped", groups=[[0], [1]], output_dim=4, name="tower")
    ids = keras.Input((6,), dtype="int32")
    docs = keras.Input((6,), dtype="int32")
    model = keras.Model([ids, docs], tower([ids, docs]))
    assert tower.blocks[0] is not tower.blocks[1]
    assert tower.get_config()["block"] == {**spec, "type": "custom"}
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    xs = [_tokens(0).numpy(), _tokens(1).numpy()]
    for a, b in zip(model.predict(xs, verbose=0), loaded.predict(xs, verbose=0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "factory",
    [
        "no_such_module_for_dist_share:make",
        f"{__name__}:make_nothing",
        f"{__name__}:NOT_CALLABLE",
    ],
    ids=["bad_module", "bad_attribute", "not_callable"],
)
def test_yaml_factory_errors_name_the_key(factory: str) -> None:
    """Through the config's own validation (what `dist-share config/train` runs)."""
    raw = {
        "model": {"family": "siamese", "tower": {"block": {"type": "custom", "factory": factory}}}
    }
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert err.value.path == FACTORY_PATH


@pytest.mark.parametrize(
    ("block", "match", "path"),
    [
        (
            {"type": "custom", "factory": f"{__name__}:returns_a_dict"},
            "returned a dict",
            FACTORY_PATH,
        ),
        ({"type": "keras_application", "name": "MobileNetV3Small"}, "input_size", "stream left"),
    ],
    ids=["factory_wrong_return_type", "keras_application_too_small"],
)
def test_yaml_block_that_fails_the_build_names_the_key(block: dict, match: str, path: str) -> None:
    """A wrong factory fails the build by its key; an application too small for the images, by
    the stream."""
    cfg = validate({"model": {"family": "siamese", "tower": {"block": block}}})
    specs = {n: tf.TensorSpec((8, 8, 1), tf.float32) for n in ("left", "right")}
    with pytest.raises(ConfigError, match=match) as err:
        models.build_model(cfg.model, specs)
    assert err.value.path == path


def test_keras_application_spec_on_small_images() -> None:
    spec = {"type": "keras_application", "name": "MobileNetV3Small", "input_size": [32, 32]}
    normalised = validate_block_spec(spec)
    assert normalised["args"] == {} and normalised.to_dict()["input_size"] == [32, 32]
    tower = SharedTower(normalised, 2, output_dim=6)
    out = tower(tf.random.uniform((B, 2, 8, 8, 1)), training=True)
    assert out.shape == (B, 2, 6)
    assert any("batch_norm" in p or "bn" in p.lower() for p in tower.folded_layers)
    with pytest.raises(ConfigError, match="unknown Keras application") as err:
        validate_block_spec({"type": "keras_application", "name": "ResNet5"})
    assert err.value.path == "model.tower.block.name"


# -- Keras citizenship: save/load, fit, mixed precision ------------------------------------------
def _pair_model(tower: SharedTower, shape: tuple, dtype: str = "float32") -> keras.Model:
    left, right = keras.Input(shape, dtype=dtype), keras.Input(shape, dtype=dtype)
    a, b = tower([left, right])
    return keras.Model([left, right], L2Distance()([a, b]))


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_save_load_fit_round_trip(kind: str, tmp_path) -> None:
    factory, _, streams = KINDS[kind]
    keras.utils.set_random_seed(4)
    xs = streams()[:2]
    tower = SharedTower(factory(), 2, output_dim=4, name="tower")
    model = _pair_model(tower, tuple(xs[0].shape[1:]))
    model.compile(optimizer="sgd", loss="mse")
    xs = [x.numpy() for x in xs]
    y = np.ones((B,), "float32")
    history = model.fit(xs, y, epochs=3, batch_size=B, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert tower.folded_layers, "BatchNormalization converted before fit"
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        model.predict(xs, verbose=0), loaded.predict(xs, verbose=0), rtol=1e-5
    )
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(
        isinstance(lyr, FoldedBatchNormalization)
        for lyr in loaded.get_layer("tower").blocks[0]._flatten_layers()
    )


def test_mixed_precision_user_tower_trains() -> None:
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(5)
        tower = SharedTower(make_functional(), 2, output_dim=4, name="tower")
        model = _pair_model(tower, (10,))
        model.compile(optimizer="sgd", loss="mse")
        xs = [np.random.rand(8, 10).astype("float32") for _ in range(2)]
        history = model.fit(xs, np.ones((8,), "float32"), epochs=2, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert tower.blocks[0].layers[1].compute_dtype == "float16"
        assert all(w.dtype == "float32" for w in tower.weights)
        assert tower(xs, training=False)[0].dtype == "float16"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
