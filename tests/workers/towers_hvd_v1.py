"""Worker: TF1 graph-mode shared tower trained with hvd.DistributedOptimizer on 2 ranks.

A classic shared conv (variable_scope reuse) feeds a switchable MLP (both weight sets created
outside tf.cond, a bool placeholder selects). Each rank feeds *different* data, so the ranks
stay identical only if the gradients really are averaged. Writes argv[1]/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

tf.compat.v1.disable_eager_execution()

import horovod.tensorflow as hvd  # noqa: E402

from dist_share.compat import v1 as cv1  # noqa: E402

v1 = tf.compat.v1


def main(out_dir: str) -> None:
    hvd.init()
    rank = hvd.rank()
    v1.set_random_seed(1234 + rank)  # different initial values: the broadcast must fix them
    xs = [v1.placeholder(tf.float32, [None, 6, 6, 1], name=f"x{i}") for i in range(2)]
    targets = [v1.placeholder(tf.float32, [None, 3], name=f"t{i}") for i in range(2)]
    use_shared = v1.placeholder_with_default(True, [], name="use_shared")

    feats = cv1.shared_conv2d(xs, filters=2, kernel_size=3, scope="conv", activation=tf.nn.relu)
    flat = [tf.reshape(f, [-1, 6 * 6 * 2]) for f in feats]
    outs = cv1.switchable_tower(
        flat,
        use_shared,
        make_params=lambda scope, x: cv1.mlp_params(scope, int(x.shape[-1]), [8, 3]),
        apply=cv1.mlp,
        scope="mlp",
    )
    loss = tf.add_n([tf.reduce_mean(tf.square(o - t)) for o, t in zip(outs, targets, strict=True)])
    opt = hvd.DistributedOptimizer(v1.train.GradientDescentOptimizer(0.05))
    train_op = opt.minimize(loss)
    variables = v1.trainable_variables()

    rng = np.random.default_rng(rank)
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        sess.run(hvd.broadcast_global_variables(0))
        initial = sess.run(variables)
        snapshots = {}
        for phase, flag in (("shared", True), ("separate", False)):
            for _ in range(3):
                feed = {x: rng.normal(size=(4, 6, 6, 1)) for x in xs}
                feed.update({t: rng.normal(size=(4, 3)) for t in targets})
                feed[use_shared] = flag
                sess.run(train_op, feed)
            snapshots[phase] = sess.run(variables)
    result = {
        "rank": rank,
        "size": hvd.size(),
        "names": [v.name for v in variables],
        "initial": [a.tolist() for a in initial],
        "after_shared": [a.tolist() for a in snapshots["shared"]],
        "after_separate": [a.tolist() for a in snapshots["separate"]],
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
