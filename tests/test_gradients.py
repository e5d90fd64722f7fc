"""Sparse-gradient dedup, the dense switch, compression and byte counting (in process, eager)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from dist_share import config
from dist_share import gradients as G
from dist_share.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))

import train_common as tc  # noqa: E402


def slices(indices: list[int], rows: int = 10, dim: int = 3) -> tf.IndexedSlices:
    values = tf.constant(np.arange(len(indices) * dim, dtype=np.float32).reshape(-1, dim))
    return tf.IndexedSlices(values, tf.constant(indices, tf.int32), tf.constant([rows, dim]))


def test_dedup_sums_repeated_rows() -> None:
    g = slices([4, 1, 4, 4, 1, 7])
    d = G.dedup_indexed_slices(g)
    np.testing.assert_allclose(tf.convert_to_tensor(d), tf.convert_to_tensor(g))
    assert sorted(d.indices.numpy().tolist()) == [1, 4, 7]
    assert int(G.comm_bytes([d])) == 3 * 3 * 4 + 3 * 4
    assert int(G.comm_bytes([g])) == 6 * 3 * 4 + 6 * 4


def test_comm_bytes_counts_dense_by_size_and_compression_halves_it() -> None:
    dense = tf.zeros([5, 7])
    assert int(G.comm_bytes([dense, None])) == 5 * 7 * 4
    assert int(G.comm_bytes([G._compress(dense, tf.float16)])) == 5 * 7 * 2
    sparse = G._compress(slices([1, 2]), tf.bfloat16)
    assert int(G.comm_bytes([sparse])) == 2 * 3 * 2 + 2 * 4  # indices stay int32


def test_dense_switch_uses_static_density() -> None:
    opts = G.GradientOptions(dense_threshold=0.5)
    assert isinstance(G.prepare_gradient(slices([1, 2, 3]), opts), tf.IndexedSlices)  # 3/10
    dense = G.prepare_gradient(slices([1, 2, 3, 1, 2, 3]), opts)  # 6/10 >= 0.5
    assert not isinstance(dense, tf.IndexedSlices)
    np.testing.assert_allclose(dense, tf.convert_to_tensor(slices([1, 2, 3, 1, 2, 3])))
    assert not isinstance(
        G.prepare_gradient(slices([1]), G.GradientOptions(sparse_as_dense=True)), tf.IndexedSlices
    )
    naive = G.prepare_gradient(slices([1, 1]), G.GradientOptions(dedup=False, dense_threshold=None))
    assert naive.indices.shape[0] == 2


def test_shared_embedding_gradient_dedup_same_update_fewer_bytes() -> None:
    """One table read by three id streams: repeated rows, the same gradient after dedup."""
    spec = tc.build_two_tower()
    feats, labels = tc.arrays("two_tower", n=16)
    table = spec.model.get_layer("table").embeddings
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(spec.loss(labels, spec.model(feats)))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    assert grad.indices.shape[0] == 16 * (1 + 3 + 1)  # one row per stream use and example
    opts_naive = G.GradientOptions(dedup=False, dense_threshold=None)
    naive, naive_bytes = G.reduce_gradients([grad], opts_naive, "tf_distribute")
    dedup, dedup_bytes = G.reduce_gradients([grad], G.GradientOptions(), "tf_distribute")
    np.testing.assert_allclose(
        tf.convert_to_tensor(dedup[0]), tf.convert_to_tensor(naive[0]), rtol=1e-6, atol=1e-7
    )
    assert int(dedup_bytes) < int(naive_bytes) / 5  # 6 popular ids vs 80 rows


@pytest.mark.parametrize(
    ("cfg", "path"),
    [
        ({"horovod": {"compression": "int8"}}, "strategy.horovod.compression"),
        ({"horovod": {"op": "max"}}, "strategy.horovod.op"),
        ({"sparse": {"dense_threshold": -1}}, "strategy.sparse.dense_threshold"),
    ],
)
def test_bad_options_name_the_key(cfg: dict, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.validate({"model": {"family": "siamese"}, "strategy": cfg})
    assert e.value.path == path


def test_options_come_from_the_strategy_section() -> None:
    strategy = config.validate(
        {
            "model": {"family": "two_tower"},
            "strategy": {"horovod": {"compression": "fp16"}, "sparse": {"dense_threshold": None}},
        }
    ).strategy
    opts = G.GradientOptions.from_config(strategy)
    assert (opts.compression, opts.dense_threshold, opts.dedup) == ("fp16", None, True)
