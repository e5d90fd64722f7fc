"""Batched weight sets: separate / grouped MLP towers in one batched op, same as one set after another."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_share.model import batched_sets
from dist_share.model.towers import SharedTower

MLP = {"type": "mlp", "units": [16, 8], "activation": "relu"}


def _pair(sharing: str, n: int, groups=None, block=MLP, output_dim=4):
    """The same tower twice (batched and not), with identical weights."""
    kw = {"num_streams": n, "sharing": sharing, "groups": groups, "output_dim": output_dim}
    batched = SharedTower(block, batch_sets=True, name="tower", **kw)
    plain = SharedTower(block, batch_sets=False, name="tower", **kw)
    return batched, plain


def _inputs(n: int, stacked: bool, batch: int = 5, shape=(3, 2)):
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.normal(size=(batch, *shape)).astype(np.float32)) for _ in range(n)]
    return tf.stack(xs, axis=1) if stacked else xs


def _run(tower, xs):
    with tf.GradientTape() as tape:
        out = tower(xs, training=True)
        outs = tf.unstack(out, axis=1) if not isinstance(out, list) else out
        # Different weights per stream so each set's gradient differs.
        loss = tf.add_n([(i + 1.0) * tf.reduce_sum(tf.square(o)) for i, o in enumerate(outs)])
    grads = tape.gradient(loss, tower.trainable_variables)
    # switchable: the unused (shared) set gets no gradient in either form.
    return [o.numpy() for o in outs], [None if g is None else g.numpy() for g in grads]


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize(
    ("sharing", "n", "groups"),
    [("separate", 4, None), ("grouped", 6, [[0, 3], [1, 4], [2, 5]]), ("switchable", 3, None)],
)
def test_batched_equals_one_set_after_another(sharing, n, groups, stacked) -> None:
    batched, plain = _pair(sharing, n, groups)
    xs = _inputs(n, stacked)
    batched(xs)
    plain(xs)
    plain.set_weights(batched.get_weights())  # same variables, same order: checkpoints agree
    if sharing == "switchable":
        for t in (batched, plain):
            t.use_shared.assign(False)
    assert [v.path for v in batched.weights] == [v.path for v in plain.weights]
    sets = [batched._set_streams(i) for i in range(batched.num_weight_sets)]
    first = 1 if sharing == "switchable" else 0
    assert batched_sets.can_batch(batched.blocks[first:], sets[first:])
    out_b, grad_b = _run(batched, xs)
    out_p, grad_p = _run(plain, xs)
    for a, b in zip(out_b, out_p, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(grad_b) == len(grad_p) == len(batched.trainable_variables)
    for a, b in zip(grad_b, grad_p, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(np.abs(g).sum() > 0 for g in grad_b if g is not None)  # every used set learns


def test_batched_in_a_tf_function_and_sets_move_independently() -> None:
    tower, _ = _pair("separate", 3)
    assert tower.batch_sets
    xs = _inputs(3, stacked=True)
    tower(xs)
    before = [w.numpy().copy() for w in tower.trainable_variables]
    opt = tf.keras.optimizers.SGD(0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = tower(xs, training=True)
            loss = tf.reduce_sum(tf.square(out[:, 0]))  # only stream 0's set gets a gradient
        grads = tape.gradient(loss, tower.trainable_variables)
        opt.apply_gradients(zip(grads, tower.trainable_variables, strict=True))

    step()
    moved = [
        not np.array_equal(b, w.numpy())
        for b, w in zip(before, tower.trainable_variables, strict=True)
    ]
    per_set = len(moved) // 3
    assert all(moved[:per_set]) and not any(moved[per_set:])


@pytest.mark.parametrize(
    ("block", "sharing", "groups"),
    [
        ({"type": "mlp", "units": [8], "norm": "batch"}, "separate", None),
        ({"type": "mlp", "units": [8]}, "grouped", [[0, 1], [2]]),
        ({"type": "conv2d", "filters": [4], "kernel_size": 3, "dense": [8]}, "separate", None),
    ],
)
def test_blocks_that_cannot_batch_fall_back(block, sharing, groups) -> None:
    n = 3
    tower = SharedTower(block, num_streams=n, sharing=sharing, groups=groups, output_dim=4)
    shape = (6, 6, 1) if block["type"] == "conv2d" else (3, 2)
    xs = _inputs(n, stacked=False, shape=shape)
    out = tower(xs)
    sets = [tower._set_streams(i) for i in range(tower.num_weight_sets)]
    assert not batched_sets.can_batch(tower.blocks, sets)
    assert [tuple(o.shape) for o in out] == [(5, 4)] * n


def test_config_round_trip_keeps_the_flag() -> None:
    tower = SharedTower(MLP, num_streams=2, sharing="separate", batch_sets=True)
    assert SharedTower.from_config(tower.get_config()).batch_sets is True
    assert SharedTower(MLP, num_streams=2, sharing="separate").batch_sets is False
