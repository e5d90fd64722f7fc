"""The command line of the check scripts run on several replicas: the strategy they run under,
built before TensorFlow starts, and the JSON file each process writes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dist_share.files import atomic_write_text


def strategy_from_argv() -> tuple[Any, str]:
    """The strategy ``--strategy`` (and ``--num-cpu-devices``) name, and the ``--out`` prefix."""
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--num-cpu-devices", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    return get_strategy(StrategyConfig(name=a.strategy, num_cpu_devices=a.num_cpu_devices)), a.out


def write_result(out: str, strategy: Any, result: dict) -> None:
    """This process's result, as ``OUT.rank{R}.json``."""
    atomic_write_text(f"{out}.rank{strategy.rank}.json", json.dumps(result))
