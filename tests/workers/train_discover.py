"""Build the multiworker strategy with no TF_CONFIG (found from the launcher) and all-reduce once."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    assert "TF_CONFIG" not in os.environ, "the test must not hand TF_CONFIG to this worker"
    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name="multiworker"))
    import tensorflow as tf

    value = tf.constant(float(strategy.rank + 1))
    per_replica = strategy.run(lambda: tf.identity(value))
    total = float(strategy.reduce_sum(per_replica))
    out = {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "total": total,
        "tf_config": json.loads(os.environ["TF_CONFIG"]),
    }
    with open(f"{sys.argv[1]}.rank{strategy.rank}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
