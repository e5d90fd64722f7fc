"""Batch normalisation across replicas equals one replica on the whole batch.

Run as ``python tests/workers/sync_bn_check.py --strategy mirrored --num-cpu-devices 2 --out F``
or under ``horovodrun -np 2 ... --strategy horovod``; writes ``F.rank{R}.json`` with, per case,
the largest relative difference from one replica on the whole global batch of the outputs, the
input gradients, the weight gradients (summed over replicas) and the moving statistics.
"""

from __future__ import annotations

from typing import Any

from tests.workers.replicas import strategy_from_argv, write_result

BUILTIN = {
    "type": "conv2d",
    "filters": [3, 4],
    "kernel_size": 3,
    "pool_size": 2,
    "norm": "batch",
    "dense": [5],
}
OUT = 4


def make_user_model(sync: bool) -> Any:
    """A user's Keras tower with two BatchNormalization layers (conv and dense)."""
    import keras

    from dist_share.model.folding import FoldedBatchNormalization

    def norm(momentum: float) -> Any:
        if sync:  # converted by the tower
            return keras.layers.BatchNormalization(momentum=momentum)
        return FoldedBatchNormalization(momentum=momentum, sync=False)  # the opt-out

    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Activation("relu")(norm(0.9)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = norm(0.8)(keras.layers.Dense(5)(x))
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="user_encoder")


def make_tower(kind: str, sync: bool) -> Any:
    from dist_share.model.towers import SharedTower

    if kind == "builtin":
        return SharedTower({**BUILTIN, "norm_sync": sync}, 3, output_dim=OUT)
    return SharedTower(make_user_model(sync), 2, output_dim=OUT)


def compare(strategy: Any, kind: str, sizes: list[int], sync: bool) -> dict:
    """Largest relative differences between the split step and one replica on the batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dist_share.model.cross_replica import local_only

    streams = 3 if kind == "builtin" else 2
    shape = (8, 8, 1) if kind == "builtin" else (6, 6, 2)
    total = sum(sizes)
    starts = np.cumsum([0, *sizes])
    rng = np.random.default_rng(len(sizes) + total + sync)
    # Streams with different statistics, so that mixing them or the replicas would show.
    data = np.stack(
        [rng.normal(2.0 * s, 1.0 + s, (total, *shape)) for s in range(streams)], axis=1
    ).astype(np.float32)
    coeffs = rng.normal(size=(total, streams, OUT)).astype(np.float32)

    def step(tower: Any, rows: tf.Tensor, coeff: tf.Tensor) -> tuple:
        with tf.GradientTape() as tape:
            tape.watch(rows)
            # A user tower gets a list (stream-major fold), the built-in one the stacked input
            # (stream-minor fold): both layouts cross the replicas.
            inp = rows if kind == "builtin" else tf.unstack(rows, axis=1)
            out = tower(inp, training=True)
            out = out if kind == "builtin" else tf.stack(out, axis=1)
            loss = tf.reduce_sum(out * coeff)
        grads = tape.gradient(loss, [rows, *tower.trainable_weights])
        stats = [tf.identity(w.value) for w in tower.non_trainable_weights]
        return out, grads[0], grads[1:], stats

    keras.utils.set_random_seed(0)
    with strategy.scope():
        tower = make_tower(kind, sync)
        tower(tf.zeros((1, streams, *shape)) if kind == "builtin" else [tf.zeros((1, *shape))] * 2)
    keras.utils.set_random_seed(0)
    with local_only():
        ref = make_tower(kind, sync)
        ref(tf.zeros((1, streams, *shape)) if kind == "builtin" else [tf.zeros((1, *shape))] * 2)
        ref.set_weights(tower.get_weights())
        r_out, r_dx, r_dw, r_stats = step(ref, tf.constant(data), tf.constant(coeffs))

    def replica_fn(rows: tf.Tensor, coeff: tf.Tensor) -> tuple:
        return step(tower, rows, coeff)

    def part(array: np.ndarray, replica: int) -> tf.Tensor:
        return tf.constant(array[starts[replica] : starts[replica + 1]])

    if strategy.name == "horovod":
        rank = strategy.rank
        outs = [tf.function(replica_fn)(part(data, rank), part(coeffs, rank))]
        ids = [rank]
        local_dw = [np.asarray(g) for g in outs[0][2]]
        dw = [strategy.hvd.allreduce(g, op=strategy.hvd.Sum).numpy() for g in local_dw]
    else:
        tf_strategy = strategy.tf_strategy
        rows, coeff = (
            tf_strategy.experimental_distribute_values_from_function(
                lambda ctx, a=a: part(a, ctx.replica_id_in_sync_group)
            )
            for a in (data, coeffs)
        )
        per_replica = tf_strategy.run(tf.function(replica_fn), args=(rows, coeff))
        flat = [strategy.local_results(v) for v in tf.nest.flatten(per_replica)]
        outs = [
            tf.nest.pack_sequence_as(per_replica, [f[i] for f in flat]) for i in range(len(sizes))
        ]
        ids = list(range(len(sizes)))
        dw = [sum(np.asarray(o[2][j]) for o in outs) for j in range(len(r_dw))]

    def rel(a: Any, b: Any, scale: float | None = None) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = float(np.max(np.abs(b))) if scale is None else scale
        return float(np.max(np.abs(a - b)) / max(1.0, scale))

    diffs = {"output": 0.0, "input_grad": 0.0, "stats": 0.0}
    for rid, (out, dx, _, stats) in zip(ids, outs, strict=True):
        rows = slice(starts[rid], starts[rid + 1])
        diffs["output"] = max(diffs["output"], rel(out, r_out.numpy()[rows]))
        diffs["input_grad"] = max(diffs["input_grad"], rel(dx, r_dx.numpy()[rows]))
        for s, r in zip(stats, r_stats, strict=True):
            diffs["stats"] = max(diffs["stats"], rel(s, r))
    # Relative to the largest gradient: a gradient that cancels out (the bias before a batch
    # norm) is rounding noise of that size, summed in another order over the replicas.
    scale = max(float(np.max(np.abs(np.asarray(g)))) for g in r_dw)
    diffs["weight_grad"] = max(rel(a, b, scale) for a, b in zip(dw, r_dw, strict=True))
    diffs["weight_grad_by_variable"] = {
        w.path: rel(a, b) for w, a, b in zip(ref.trainable_weights, dw, r_dw, strict=True)
    }
    diffs["num_stats"] = len(r_stats)
    return diffs


def main() -> None:
    strategy, out = strategy_from_argv()
    replicas = strategy.num_replicas
    result: dict = {"num_replicas": replicas, "cases": {}}
    for kind in ("builtin", "user"):
        for split, sizes, sync in (
            ("even", [4] * replicas, True),
            ("uneven", [5, 2] + [3] * (replicas - 2), True),
            ("even_local", [4] * replicas, False),
        ):
            result["cases"][f"{kind}_{split}"] = compare(strategy, kind, sizes, sync)

    write_result(out, strategy, result)


if __name__ == "__main__":
    main()
