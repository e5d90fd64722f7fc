"""Each ``strategy.cross_device_ops`` of MirroredStrategy sums over 2 logical CPU devices; nccl
on a process without GPUs is a one-line ConfigError. Prints one JSON line."""

from __future__ import annotations

import json

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.errors import ConfigError


def main() -> None:
    import tensorflow as tf

    sums = {}
    for ops in ("auto", "hierarchical_copy", "reduction_to_one_device"):
        strategy = get_strategy(
            StrategyConfig(name="mirrored", num_cpu_devices=2, cross_device_ops=ops)
        )
        tf_strategy = strategy.tf_strategy

        @tf.function
        def total(tf_strategy: tf.distribute.Strategy = tf_strategy) -> tf.Tensor:
            def replica() -> tf.Tensor:
                context = tf.distribute.get_replica_context()
                value = tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0
                return context.all_reduce("sum", tf.fill([3], value))

            return tf_strategy.experimental_local_results(tf_strategy.run(replica))[0]

        sums[ops] = {
            "all_reduce": total().numpy().tolist(),
            "class": type(tf_strategy.extended._cross_device_ops).__name__,
        }
    try:
        get_strategy(StrategyConfig(name="mirrored", num_cpu_devices=2, cross_device_ops="nccl"))
        nccl = None
    except ConfigError as e:
        nccl = [e.path, str(e)]
    print(json.dumps({"sums": sums, "nccl": nccl}))


if __name__ == "__main__":
    main()
