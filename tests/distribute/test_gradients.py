"""Sparse-gradient dedup, the dense switch, compression and byte counting.

In process (eager, one replica), plus the measured dense switch with different rows per replica
under MirroredStrategy (2 logical CPUs) and horovodrun -np 2 (tests/workers/dense_switch.py, run
inside the session's shared launches).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_share.distribute import gradients as G
from dist_share.errors import ConfigError
from dist_share.run.resolve import validate
from tests.helpers import train_jobs
from tests.workers import dense_switch as worker
from tests.workers import train_common as tc


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


def test_static_rule_uses_static_density() -> None:
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
        ({"sparse": {"dense_threshold": "half"}}, "strategy.sparse.dense_threshold"),
        ({"sparse": {"dense_switch": "dynamic"}}, "strategy.sparse.dense_switch"),
    ],
)
def test_bad_options_name_the_key(cfg: dict, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate({"model": {"family": "siamese"}, "strategy": cfg})
    assert e.value.path == path


def test_options_come_from_the_strategy_section() -> None:
    strategy = validate(
        {
            "model": {"family": "two_tower"},
            "strategy": {"horovod": {"compression": "fp16"}, "sparse": {"dense_threshold": None}},
        }
    ).strategy
    opts = G.GradientOptions.from_config(strategy)
    assert (opts.compression, opts.dense_threshold, opts.dedup) == ("fp16", None, True)
    assert opts.dense_switch == "measured"


def test_cost_model_crossover_matches_the_issue_example() -> None:
    """2.06 MB of rows per worker vs a 25.6 MB table: all-gather wins up to 24 workers."""
    rows, table = 2.06e6, 25.6e6
    assert G.allgather_bytes(rows, 24) < G.ring_allreduce_bytes(table, 24)
    assert G.allgather_bytes(rows, 25) > G.ring_allreduce_bytes(table, 25)
    assert not G.dense_wins(24 * rows, table, 24)
    assert G.dense_wins(25 * rows, table, 25)
    assert G.ring_allreduce_bytes(table, 1) == G.allgather_bytes(rows, 1) == 0.0
    # One replica: nothing crosses a link, keep the smaller payload.
    assert not G.dense_wins(table, table, 1) and G.dense_wins(table + 1, table, 1)
    assert not G.dense_wins(1.9 * table, table, 2) and G.dense_wins(2.1 * table, table, 2)


@pytest.mark.parametrize(
    ("indices", "dense"),
    [([1, 2, 3, 1, 2, 3], False), (list(range(9)) + [0, 1, 2], True)],
)
def test_measured_switch_one_replica_keeps_the_smaller_payload(
    indices: list[int], dense: bool
) -> None:
    """Six lookups of three ids in a 10-row table: the static bound (60 %) would densify; the
    measured rule sees 3 distinct rows (48 B < 120 B) and stays sparse. Nine distinct rows
    (144 B) are more than the table (120 B): dense."""
    g = slices(indices)
    (out,), nbytes = G.reduce_gradients([g], G.GradientOptions(), "tf_distribute")
    assert isinstance(out, tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(out), tf.convert_to_tensor(g))
    distinct = len(set(indices))
    sparse_bytes, table_bytes = distinct * (3 * 4 + 4), 10 * 3 * 4
    assert int(nbytes) == (table_bytes if dense else sparse_bytes)
    assert int(nbytes) == min(sparse_bytes, table_bytes)
    static = G.GradientOptions(dense_switch="static")
    (_,), static_bytes = G.reduce_gradients([g], static, "tf_distribute")
    assert int(static_bytes) == table_bytes  # the static bound says >= 50 % in both cases


def test_measured_switch_in_a_tf_function_with_changing_ids() -> None:
    """One trace, run-time counts: the same compiled step takes both branches."""
    options = G.GradientOptions()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def step(ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        g = tf.IndexedSlices(tf.ones([tf.shape(ids)[0], 3]), ids, tf.constant([10, 3]))
        (out,), nbytes = G.reduce_gradients([g], options, "tf_distribute")
        return tf.convert_to_tensor(out), nbytes

    few, few_bytes = step(tf.constant([4, 4, 5]))
    many, many_bytes = step(tf.constant(list(range(10))))
    np.testing.assert_allclose(few.numpy().sum(axis=1), 3 * np.bincount([4, 4, 5], minlength=10))
    np.testing.assert_allclose(many.numpy(), np.ones([10, 3]))
    assert int(few_bytes) == 2 * 16 and int(many_bytes) == 120
    assert step.experimental_get_tracing_count() == 1


def _expected(case: str, value_bytes: int = 4, average: bool = False) -> dict:
    """What each replica must report for a worker case: the branch from the cost model on the
    *summed* distinct counts, the bytes of that branch, and the reduced gradients."""
    ids = worker.CASES[case]
    row, table = worker.DIM * value_bytes + 4, worker.ROWS * worker.DIM * value_bytes
    distinct = [len(set(i)) for i in ids]
    dense = bool(G.dense_wins(sum(distinct) * row, table, 2))
    dense_grad, counts = 3 * 2 * value_bytes, 8
    if dense:
        sent = [dense_grad + counts + table + row] * 2  # + the one zero row of the dense branch
    else:
        sent = [dense_grad + counts + d * row for d in distinct]
    total = sum((r + 1) * np.bincount(i, minlength=worker.ROWS) for r, i in enumerate(ids))
    div = 2.0 if average else 1.0
    return {
        "dense": dense,
        "bytes": sent,
        "table": np.repeat(total[:, None], worker.DIM, axis=1) / div,
        "dense_grad": np.full([3, 2], 3.0 / div),
    }


def _check_worker_results(launcher: str, variants: dict[str, dict]) -> None:
    replicas: dict[str, dict] = {}
    for per_process in train_jobs.check(launcher, "dense_switch"):
        replicas.update(per_process)
    assert sorted(replicas) == ["0", "1"]
    results = [replicas["0"], replicas["1"]]
    for suffix, kwargs in variants.items():
        branches = {}
        for case in worker.CASES:
            exp = _expected(case, **kwargs)
            branches[case] = exp["dense"]
            for r, res in enumerate(results):
                got, where = res[case + suffix], f"{case}{suffix} replica {r}"
                assert got["bytes"] == exp["bytes"][r], f"{where} took the other branch"
                np.testing.assert_allclose(got["table"], exp["table"], err_msg=where)
                np.testing.assert_allclose(got["dense"], exp["dense_grad"], err_msg=where)
        # Both branches are exercised, and in 'skewed' and 'dense' the replicas' own counts
        # point different ways (30/40 vs 1/40 rows; 40/40 vs 30/40 rows).
        assert branches == {"sparse": False, "skewed": False, "dense": True}


# The worker's check runs inside the session's shared launches (tests/helpers/train_jobs.py).
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_dense_switch_agrees_across_mirrored_replicas() -> None:
    _check_worker_results("mirrored", {"": {}})


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_dense_switch_agrees_across_horovod_ranks() -> None:
    variants = {"": {}, "/fp16_average": {"value_bytes": 2, "average": True}}
    _check_worker_results("horovod_gloo", variants)
