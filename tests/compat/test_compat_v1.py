"""TF1 graph-mode helpers: classic variable_scope sharing and the conditional variant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dist_share.compat import v1 as cv1
from tests.helpers.paths import WORKERS
from tests.helpers.processes import local_horovodrun_command, run_job

v1 = tf.compat.v1


def _graph():
    return tf.Graph().as_default()


def test_shared_dense_one_weight_set_and_summed_gradient() -> None:
    with _graph():
        xs = [v1.placeholder(tf.float32, [None, 4]) for _ in range(3)]
        outs = cv1.shared_dense(xs, 5, scope="tower/dense", activation=tf.nn.tanh)
        assert [v.name for v in v1.trainable_variables()] == [
            "tower/dense/kernel:0",
            "tower/dense/bias:0",
        ]
        kernel = v1.trainable_variables()[0]
        losses = [tf.reduce_sum(o * float(i + 1)) for i, o in enumerate(outs)]
        total = tf.gradients(tf.add_n(losses), kernel)[0]
        branches = [tf.gradients(part, kernel)[0] for part in losses]
        rng = np.random.default_rng(0)
        feed = {x: rng.normal(size=(2, 4)) for x in xs}
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            g, parts = sess.run([total, branches], feed)
        np.testing.assert_allclose(g, sum(parts), rtol=1e-5, atol=1e-6)
        assert all(np.abs(p).sum() > 0 for p in parts)


def test_shared_conv2d_and_tower_reuse() -> None:
    with _graph():
        xs = [v1.placeholder(tf.float32, [None, 5, 5, 2]) for _ in range(2)]
        outs = cv1.shared_conv2d(xs, filters=3, kernel_size=3, scope="conv")
        assert len(v1.trainable_variables()) == 2
        assert outs[0].shape.as_list() == [None, 5, 5, 3]

        def tower(x):  # classic user code: plain get_variable, no reuse flag of its own
            w = v1.get_variable("w", [x.shape[-1], 2])
            return tf.matmul(x, w)

        flats = [v1.placeholder(tf.float32, [None, 4]) for _ in range(3)]
        cv1.shared_tower(flats, tower, scope="head")
        assert [v.name for v in v1.trainable_variables()][2:] == ["head/w:0"]
        with pytest.raises(ValueError, match="already exists"):
            cv1.shared_dense(
                flats, 2, scope="conv"
            )  # the classic guard: reuse=False on a taken scope


def test_switchable_creates_all_sets_outside_cond_and_selects() -> None:
    with _graph():
        xs = [v1.placeholder(tf.float32, [None, 4]) for _ in range(2)]
        flag = v1.placeholder_with_default(True, [])
        outs = cv1.switchable_tower(
            xs, flag, lambda s, x: cv1.mlp_params(s, 4, [6, 3]), cv1.mlp, scope="t"
        )
        names = [v.name for v in v1.trainable_variables()]
        assert len(names) == 3 * 4  # (1 + N) sets x 2 layers x (kernel, bias)
        assert {n.split("/")[1] for n in names} == {"shared", "stream_0", "stream_1"}
        # No variable lives in a control-flow context (the classic bug).
        for v in v1.global_variables():
            assert v.op._control_flow_context is None, v.name
        loss = tf.add_n([tf.reduce_sum(tf.square(o)) for o in outs])
        opt = v1.train.GradientDescentOptimizer(0.1)
        grads_and_vars = opt.compute_gradients(loss)
        train = opt.apply_gradients(grads_and_vars)
        variables = v1.trainable_variables()
        rng = np.random.default_rng(0)
        feed = {x: rng.normal(size=(3, 4)) for x in xs}
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for use_shared in (True, False):
                feed[flag] = use_shared
                before = sess.run(variables)
                grads = sess.run([g for g, _ in grads_and_vars], feed)
                sess.run(train, feed)
                after = sess.run(variables)
                for v, g, b, a in zip(variables, grads, before, after, strict=True):
                    active = ("/shared/" in v.name) == use_shared
                    assert (np.abs(g).sum() > 0) == active, (use_shared, v.name)
                    assert (not np.array_equal(b, a)) == active, (use_shared, v.name)
            # Shared branch equals running the shared weights on each stream.
            feed[flag] = True
            got = sess.run(outs, feed)
            shared = [p for p in cv1.mlp_params("t/shared", 4, [6, 3])]
            want = sess.run([cv1.mlp(x, shared) for x in xs], feed)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_tensor_initializers_work_because_variables_are_created_outside_cond() -> None:
    """The classic bug: get_variable with a tensor initializer inside tf.cond fails to build."""

    def make_params(scope, x):
        with v1.variable_scope(scope, reuse=v1.AUTO_REUSE):
            return v1.get_variable("w", initializer=tf.random.normal([int(x.shape[-1]), 2]))

    with _graph():
        xs = [v1.placeholder(tf.float32, [None, 4]) for _ in range(2)]
        flag = v1.placeholder_with_default(False, [])
        with pytest.raises(ValueError, match="initial_value"):
            tf.cond(
                flag,
                lambda: tf.matmul(xs[0], make_params("naive/a", xs[0])),
                lambda: tf.matmul(xs[0], make_params("naive/b", xs[0])),
            )
    with _graph():
        xs = [v1.placeholder(tf.float32, [None, 4]) for _ in range(2)]
        flag = v1.placeholder_with_default(False, [])
        outs = cv1.switchable_tower(xs, flag, make_params, tf.matmul, scope="t")
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            got = sess.run(outs, {x: np.ones((1, 4)) for x in xs})
            (w1,) = sess.run([v for v in v1.global_variables() if v.name == "t/stream_1/w:0"])
        np.testing.assert_allclose(got[1], np.ones((1, 4)) @ w1, rtol=1e-6)


@pytest.mark.multiprocess
def test_horovod_graph_mode_distributed_optimizer_keeps_ranks_identical(tmp_path: Path) -> None:
    cmd = local_horovodrun_command(
        2, [sys.executable, str(WORKERS / "towers_hvd_v1.py"), str(tmp_path)], "gloo"
    )
    run_job(cmd, timeout=240).check()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    names = ranks[0]["names"]
    assert names == ranks[1]["names"]
    for key in ("initial", "after_shared", "after_separate"):
        for name, a, b in zip(names, ranks[0][key], ranks[1][key], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=f"{key} {name}")
    r = ranks[0]
    moved = {
        phase: {
            n: not np.allclose(x0, x1) for n, x0, x1 in zip(names, r[prev], r[phase], strict=True)
        }
        for prev, phase in (("initial", "after_shared"), ("after_shared", "after_separate"))
    }
    for n in names:
        if n.startswith("conv/"):
            assert moved["after_shared"][n] and moved["after_separate"][n], n
        elif "/shared/" in n:
            assert moved["after_shared"][n] and not moved["after_separate"][n], n
        else:
            assert not moved["after_shared"][n] and moved["after_separate"][n], n
