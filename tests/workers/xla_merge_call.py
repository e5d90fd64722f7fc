"""A replica pass holding tf.distribute's own synchronisation (Keras's synchronized batch
normalisation) under MirroredStrategy on 2 logical CPUs, through `compilation.ReplicaPass`:
``try`` falls back to the uncompiled pass with the same result, ``on`` is the jit_compile
ConfigError. Prints one JSON line."""

from __future__ import annotations

import json

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy


def main() -> None:
    import keras
    import tensorflow as tf

    from dist_share.model.cross_replica import CollectiveInCompiledPass
    from dist_share.train import compilation

    tf_strategy = get_strategy(StrategyConfig(name="mirrored", num_cpu_devices=2)).tf_strategy
    with tf_strategy.scope():
        norm = keras.layers.BatchNormalization(synchronized=True)
        norm.build((None, 3))
    rows = tf.reshape(tf.range(24, dtype=tf.float32), (8, 3))
    batches = tf_strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(rows).batch(8)
    )
    batch = next(iter(batches))

    def normalised(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(norm(x, training=True) * x)

    def run(replica_pass) -> list[float]:
        @tf.function
        def step(x):
            return tf_strategy.run(replica_pass, (x,))

        return [float(v) for v in tf_strategy.experimental_local_results(step(batch))]

    out: dict = {}
    lines: list[str] = []
    plain = compilation.ReplicaPass(normalised, compilation.OFF, lines.append)
    out["plain"] = run(plain)
    tried = compilation.ReplicaPass(normalised, compilation.TRY, lines.append)
    out["try"] = {"values": run(tried), "compiled": tried.compiled, "lines": lines}
    forced = compilation.ReplicaPass(normalised, compilation.ON, lines.append)
    try:
        run(forced)
        out["on"] = None
    except CollectiveInCompiledPass:
        error = forced.error()
        out["on"] = [error.path, str(error)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
