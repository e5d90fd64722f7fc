"""Batch normalisation over the global batch: one replica per stream as Keras computes it, two
replicas (MirroredStrategy on 2 logical CPUs, horovodrun with 2 processes) as one replica on the
whole batch, the ``sync`` opt-out, the ``norm_sync`` block key and configs saved without it."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_share.errors import ConfigError
from dist_share.model.blocks.build import build_block
from dist_share.model.blocks.conv2d import Conv2DBlock
from dist_share.model.blocks.norm import StreamBatchNormalization
from dist_share.model.blocks.spec import validate_block_spec
from dist_share.model.folding import FoldedBatchNormalization, fold_streams
from dist_share.model.towers import SharedTower
from dist_share.run.resolve import validate
from tests.helpers.paths import WORKERS
from tests.helpers.processes import run_on_two_replicas

TOL = 1e-5


# -- two replicas equal one ------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.timeout(500)
@pytest.mark.parametrize("launcher", ["mirrored", "horovod"])
def test_two_replicas_equal_one_replica_on_the_whole_batch(launcher: str, tmp_path: Path) -> None:
    script = WORKERS / "sync_bn_check.py"
    for result in run_on_two_replicas(script, launcher, tmp_path / "result", timeout=400):
        for kind in ("builtin", "user"):
            for split in ("even", "uneven"):
                diffs = result["cases"][f"{kind}_{split}"]
                assert diffs["num_stats"] >= 4, diffs
                for what in ("output", "input_grad", "weight_grad", "stats"):
                    assert diffs[what] < TOL, (kind, split, what, diffs)
            # Per-replica statistics (sync off) are another function: the comparison can fail.
            local = result["cases"][f"{kind}_even_local"]
            assert local["output"] > 1e-2 and local["weight_grad"] > 1e-2, local
            assert local["stats"] > 1e-3, local


# -- one replica: what Keras computes per stream ---------------------------------------------------
def _streams(k: int, shape: tuple, seed: int = 0) -> list[tf.Tensor]:
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(2.0 * i, 1.0 + i, shape), tf.float32) for i in range(k)]


def _assert_close(actual, desired, what: str, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol=1e-5, atol=atol, err_msg=what
    )


@pytest.mark.parametrize(
    ("options", "shape", "masked"),
    [
        ({}, (4, 5, 6), False),
        ({"axis": 1, "center": False}, (4, 5, 6), False),
        ({"scale": False}, (4, 3, 3, 2), False),
        ({}, (4, 5, 6), True),
        ({"renorm": True, "renorm_momentum": 0.5}, (4, 5, 6), False),
    ],
    ids=["last_axis", "axis_1", "conv", "masked", "renorm"],
)
def test_folded_batch_norm_equals_keras_per_stream(options: dict, shape: tuple, masked) -> None:
    """Outputs, input and weight gradients, and every variable after two training calls."""
    k = 3
    folded = FoldedBatchNormalization(momentum=0.7, **options)
    keras_bn = keras.layers.BatchNormalization(momentum=0.7, **options)
    for layer in (folded, keras_bn):
        layer.build((None, *shape[1:]))
    keras_bn.set_weights(folded.get_weights())
    rng = np.random.default_rng(1)
    for step in range(2):
        xs = _streams(k, shape, seed=step)
        masks = (
            [tf.constant(rng.random(shape[:-1]) > 0.3) for _ in range(k)] if masked else [None] * k
        )
        coeff = tf.constant(rng.normal(size=(k * shape[0], *shape[1:])), tf.float32)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xs)
            with fold_streams(k):
                y = folded(
                    tf.concat(xs, 0),
                    training=True,
                    mask=tf.concat(masks, 0) if masked else None,
                )
            ref = tf.concat(
                [keras_bn(x, training=True, mask=m) for x, m in zip(xs, masks, strict=True)], 0
            )
            loss, ref_loss = tf.reduce_sum(y * coeff), tf.reduce_sum(ref * coeff)
        _assert_close(y, ref, f"output, step {step}")
        grads = tape.gradient(loss, [*xs, *folded.trainable_weights])
        ref_grads = tape.gradient(ref_loss, [*xs, *keras_bn.trainable_weights])
        for g, r in zip(grads, ref_grads, strict=True):
            _assert_close(g, r, f"gradient, step {step}", atol=1e-4)
        for w, r in zip(folded.weights, keras_bn.weights, strict=True):
            _assert_close(w, r, f"{w.name} after step {step}", atol=1e-6)
    assert not np.allclose(folded.moving_mean.numpy(), 0.0), "the statistics moved"


def test_unfolded_folded_batch_norm_is_keras_batch_norm() -> None:
    """One stream, one replica: the same numbers as keras.layers.BatchNormalization."""
    x = _streams(1, (6, 7))[0]
    folded = FoldedBatchNormalization(momentum=0.5)
    keras_bn = keras.layers.BatchNormalization(momentum=0.5)
    for layer in (folded, keras_bn):
        layer.build(x.shape)
    for _ in range(3):
        _assert_close(folded(x, training=True), keras_bn(x, training=True), "output", atol=1e-6)
    for w, r in zip(folded.weights, keras_bn.weights, strict=True):
        _assert_close(w, r, w.name, atol=1e-6)


# -- the opt-out, configs and saved models ---------------------------------------------------------
def test_sync_round_trips_and_old_configs_load_synchronised() -> None:
    layer = StreamBatchNormalization(momentum=0.9, sync=False)
    assert layer.get_config()["sync"] is False
    assert StreamBatchNormalization.from_config(layer.get_config()).sync is False
    old = {k: v for k, v in layer.get_config().items() if k != "sync"}  # saved before the key
    assert StreamBatchNormalization.from_config(old).sync is True
    # A converted user layer keeps the config its author wrote; the opt-out is saved.
    converted = keras.layers.BatchNormalization(momentum=0.8, name="bn")
    before = converted.get_config()
    converted.__class__ = FoldedBatchNormalization
    assert converted.sync is True and converted.get_config() == before
    off = FoldedBatchNormalization(sync=False, momentum=0.8)
    assert FoldedBatchNormalization.from_config(off.get_config()).sync is False
    assert FoldedBatchNormalization.from_config(before).sync is True
    # A block saved before norm_sync existed loads, synchronised.
    block = Conv2DBlock(filters=[2], norm="batch", norm_sync=False)
    assert all(not n.sync for n in block.conv_norms)
    saved = {k: v for k, v in block.get_config().items() if k != "norm_sync"}
    assert all(n.sync for n in Conv2DBlock.from_config(saved).conv_norms)


def test_norm_sync_block_key_reaches_every_batch_norm(tmp_path) -> None:
    spec = {"type": "mlp", "units": [4, 3], "norm": "batch", "norm_sync": False}
    tower = SharedTower(spec, 2, output_dim=2, name="tower")
    left, right = keras.Input((5,)), keras.Input((5,))
    model = keras.Model([left, right], tower([left, right]))
    norms = tower.blocks[0].head_norms
    assert len(norms) == 2 and not any(n.sync for n in norms)
    assert tower.get_config()["block"]["norm_sync"] is False
    assert validate_block_spec({"type": "mlp", "norm": "batch"})["norm_sync"] is True
    assert "norm_sync" not in validate_block_spec({"type": "mlp", "norm": "layer"})
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras").get_layer("tower")
    assert not any(n.sync for n in loaded.blocks[0].head_norms)
    assert all(n.sync for n in build_block({"type": "conv2d", "norm": "batch"}).conv_norms)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (
            {"type": "conv2d", "norm": "layer", "norm_sync": False},
            "only norm: batch has batch statistics to synchronise .norm is 'layer'.",
        ),
        ({"type": "mlp", "norm_sync": True}, "norm is none"),
        ({"type": "mlp", "norm": "batch", "norm_sync": "yes"}, "must be true or false"),
    ],
    ids=["layer_norm", "no_norm", "not_a_bool"],
)
def test_norm_sync_errors_name_the_key(block: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        validate_block_spec(block)
    assert err.value.path == "model.tower.block.norm_sync"
    assert "\n" not in str(err.value) and str(err.value).startswith("model.tower.block.norm_sync:")
    # The same through the config's own validation (what `dist-share config/train` runs).
    with pytest.raises(ConfigError, match=match) as err:
        validate({"model": {"family": "siamese", "tower": {"block": block}}})
    assert err.value.path == "model.tower.block.norm_sync"
