"""Blocks: built from plain data, Keras-harness clean, and StreamBatchNormalization semantics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from keras.src.testing import TestCase

from dist_share.errors import ConfigError
from dist_share.model.blocks.build import build_block
from dist_share.model.blocks.conv2d import Conv2DBlock
from dist_share.model.blocks.dense import MLPBlock
from dist_share.model.blocks.embedding import CombineFields, EmbeddingBlock
from dist_share.model.blocks.norm import StreamBatchNormalization
from dist_share.model.blocks.sequence import SequenceBlock
from dist_share.model.blocks.spec import check_block_input

# name -> (layer, arguments of Keras's own layer harness: build, serialization, training in a
# model, symbolic call).
LAYER_CASES = {
    "stream_batch_norm": (
        StreamBatchNormalization,
        dict(
            init_kwargs={"momentum": 0.9},
            input_shape=(6, 4),
            expected_output_shape=(6, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=2,
        ),
    ),
    "stream_batch_norm_folded_call": (
        StreamBatchNormalization,
        dict(
            init_kwargs={},
            input_shape=(6, 3, 3, 2),
            call_kwargs={"num_streams": 3},
            expected_output_shape=(6, 3, 3, 2),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=2,
        ),
    ),
    "mlp": (
        MLPBlock,
        dict(
            init_kwargs={"units": [5, 4], "norm": "layer", "output_dim": 3},
            input_shape=(2, 6),
            expected_output_shape=(2, 3),
            expected_num_trainable_weights=10,
        ),
    ),
    "conv2d": (
        Conv2DBlock,
        dict(
            init_kwargs={"filters": [2, 3], "norm": "batch", "dense": [4]},
            input_shape=(2, 8, 8, 1),
            expected_output_shape=(2, 4),
            expected_num_trainable_weights=12,
            expected_num_non_trainable_weights=6,
        ),
    ),
    "embedding": (
        EmbeddingBlock,
        dict(
            init_kwargs={"vocab_size": 10, "embedding_dim": 4, "combiner": "sum", "output_dim": 3},
            input_data=np.array([[1, 2], [3, 4]], "int32"),
            expected_output_shape=(2, 3),
            expected_num_trainable_weights=3,
            run_training_check=False,
        ),
    ),
    "transformer": (
        SequenceBlock,
        dict(
            init_kwargs={"kind": "transformer", "units": 4, "num_heads": 2},
            input_shape=(2, 5, 3),
            expected_output_shape=(2, 4),
        ),
    ),
}


class BlockLayerTest(TestCase):
    @parameterized.named_parameters(*((name, *case) for name, case in LAYER_CASES.items()))
    def test_layer(self, layer_cls: type, harness: dict) -> None:
        self.run_layer_test(layer_cls, **harness)


def test_stream_batch_norm_statistics_are_per_stream() -> None:
    """Folded call == separate calls: normalised outputs and sequential moving-stat updates."""
    rng = np.random.default_rng(0)
    streams = [rng.normal(loc=3 * i, scale=1 + i, size=(8, 3)).astype("float32") for i in range(3)]
    folded, single = StreamBatchNormalization(momentum=0.8), StreamBatchNormalization(momentum=0.8)
    for layer in (folded, single):
        layer.build((None, 3))
    y_fold = folded(np.concatenate(streams), training=True, num_streams=3)
    y_seq = np.concatenate([single(s, training=True).numpy() for s in streams])
    np.testing.assert_allclose(y_fold.numpy(), y_seq, atol=1e-5)
    np.testing.assert_allclose(folded.moving_mean.numpy(), single.moving_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        folded.moving_variance.numpy(), single.moving_variance.numpy(), atol=1e-5
    )
    # Stream-minor layout ([B, N] flattened) gives the same per-stream answer.
    minor = StreamBatchNormalization(momentum=0.8)
    y_minor = minor(
        np.stack(streams, 1).reshape(-1, 3), training=True, num_streams=3, stream_major=False
    )
    np.testing.assert_allclose(
        y_minor.numpy().reshape(8, 3, 3).transpose(1, 0, 2).reshape(-1, 3), y_seq, atol=1e-5
    )
    # Each stream is normalised to zero mean on its own (a mixed statistic would not do that).
    for part in np.split(y_fold.numpy(), 3):
        np.testing.assert_allclose(part.mean(0), 0.0, atol=1e-5)
    # Inference uses the moving statistics.
    y_inf = folded(streams[0], training=False).numpy()
    expected = (streams[0] - folded.moving_mean.numpy()) / np.sqrt(
        folded.moving_variance.numpy() + 1e-3
    )
    np.testing.assert_allclose(y_inf, expected, atol=1e-5)


def _previous_stream_batch_norm(x, k, stream_major, mm, mv, momentum, epsilon):
    """StreamBatchNormalization's training arithmetic before it synchronised replicas: per-stream
    ``ops.moments`` over the folded layout, then the k-update moving averages."""
    rest = tuple(x.shape[1:])
    if stream_major:
        xs, axes = x.reshape((k, -1) + rest), [1, *range(2, len(rest) + 1)]
    else:
        xs, axes = x.reshape((-1, k) + rest), [0, *range(2, len(rest) + 1)]
    mean, var = keras.ops.moments(xs, axes=axes, keepdims=True)
    y = keras.ops.reshape((xs - mean) * keras.ops.rsqrt(var + epsilon), x.shape)
    w = np.array([(1 - momentum) * momentum ** (k - 1 - i) for i in range(k)], "float32")[:, None]
    mean_k = keras.ops.reshape(mean, (k, -1)).numpy()
    var_k = keras.ops.reshape(var, (k, -1)).numpy()
    decay = momentum**k
    return y.numpy(), mm * decay + (mean_k * w).sum(0), mv * decay + (var_k * w).sum(0)


@pytest.mark.parametrize("stream_major", [True, False])
@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 5, 2)], ids=["dense", "conv"])
def test_stream_batch_norm_equals_its_per_replica_arithmetic(shape: tuple, stream_major) -> None:
    """One replica: the global-batch statistics give what the layer computed before it
    synchronised replicas, outputs and moving statistics, over three training calls."""
    k, momentum, epsilon = 3, 0.8, 1e-3
    layer = StreamBatchNormalization(momentum=momentum)
    layer.build((None, *shape[1:]))
    mm, mv = np.zeros(shape[-1], np.float32), np.ones(shape[-1], np.float32)
    rng = np.random.default_rng(5)
    for _ in range(3):
        streams = [rng.normal(3 * i, 1 + i, shape).astype("float32") for i in range(k)]
        x = (
            np.concatenate(streams)
            if stream_major
            else np.stack(streams, 1).reshape(-1, *shape[1:])
        )
        y = layer(x, training=True, num_streams=k, stream_major=stream_major).numpy()
        expected, mm, mv = _previous_stream_batch_norm(
            x, k, stream_major, mm, mv, momentum, epsilon
        )
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=0, atol=1e-6)


def test_combine_fields() -> None:
    a = tf.ones((2, 4))
    b = tf.reshape(tf.range(24, dtype=tf.float32), (2, 3, 4))
    mean = CombineFields("mean")([a, b])
    np.testing.assert_allclose(mean.numpy(), ((a + tf.reduce_mean(b, 1)) / 2).numpy())
    total = CombineFields("sum")([a, b])
    np.testing.assert_allclose(total.numpy(), (a + tf.reduce_sum(b, 1)).numpy())


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "mlp", "units": [4, 3], "norm": "batch"},
        {"type": "conv2d", "filters": [2], "kernel_size": 3, "pool_size": 2, "dense": [3]},
        {"type": "embedding", "vocab_size": 5, "embedding_dim": 3},
        {"type": "gru", "units": 3},
        {"type": "transformer", "units": 4, "num_heads": 2},
    ],
)
def test_build_block_from_plain_data_round_trips(spec: dict) -> None:
    block = build_block(spec, output_dim=2)
    clone = type(block).from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    shape = {"mlp": (2, 5), "conv2d": (2, 8, 8, 1), "gru": (2, 4, 3), "transformer": (2, 4, 3)}
    x = (
        np.array([1, 2], "int32")
        if spec["type"] == "embedding"
        else np.random.rand(*shape[spec["type"]]).astype("float32")
    )
    assert tuple(block(x).shape) == (2, 2)
    assert block.compute_output_shape(x.shape) == (2, 2)


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"type": "resnet"}, "model.tower.block.type"),
        ({"type": "mlp", "filters": [3]}, "model.tower.block.filters"),
        ({"type": "mlp", "units": [3, -1]}, "model.tower.block.units[1]"),
        ({"type": "mlp", "norm": "group"}, "model.tower.block.norm"),
        ({"type": "embedding"}, "model.tower.block.vocab_size"),
        ({"type": "embedding", "vocab_size": 3, "combiner": "max"}, "model.tower.block.combiner"),
    ],
)
def test_bad_block_spec_names_key(spec: dict, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_block(spec)
    assert err.value.path == path


@pytest.mark.parametrize(
    ("spec", "shape", "dtype", "match"),
    [
        ({"type": "conv2d"}, (64,), "float32", "height, width, channels"),
        (
            {"type": "conv2d", "filters": [4, 4, 4, 4], "pool_size": 2},
            (8, 8, 1),
            "float32",
            "too small",
        ),
        ({"type": "embedding"}, (3,), "float32", "integer ids"),
        ({"type": "mlp"}, (3,), "int32", "float input"),
        ({"type": "gru"}, (3,), "float32", "time, features"),
    ],
)
def test_check_block_input_names_the_stream(spec, shape, dtype, match) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        check_block_input(spec, shape, dtype, "stream left")
    assert err.value.path == "stream left"


def test_mlp_flattens_images_and_mixed_precision_norm_keeps_float32_stats() -> None:
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        block = build_block({"type": "mlp", "units": [4], "norm": "batch"})
        y = block(tf.random.normal((3, 2, 2, 1)), training=True)
        assert y.dtype == tf.float16 and y.shape == (3, 4)
        assert block.head_norms[0].moving_mean.dtype == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
