"""dist_share: one set of weights, many input streams, many replicas.

The names below are the public API. Each is imported on first use, so ``import dist_share`` is
cheap (no TensorFlow) and Horovod is loaded only by the ``horovod`` strategy.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__version__ = importlib.metadata.version("dist_share")  # pyproject.toml is its one home

# public name -> the module that defines it
_PUBLIC = {
    # configs
    "Config": "dist_share.config.schema",
    "load_config": "dist_share.run.resolve",
    "validate": "dist_share.run.resolve",
    "defaults": "dist_share.run.resolve",
    "replace": "dist_share.run.resolve",
    "dump": "dist_share.config.loading",
    # errors
    "ConfigError": "dist_share.errors",
    "DataError": "dist_share.errors",
    "JobError": "dist_share.errors",
    # models: weight sharing, blocks, families
    "SharedTower": "dist_share.model.towers",
    "build_block": "dist_share.model.blocks.build",
    "get_loss": "dist_share.model.losses",
    "Family": "dist_share.families.base",
    "get_family": "dist_share.families.registry",
    "ModelSpec": "dist_share.families.build",
    "build_model": "dist_share.families.build",
    # where replicas live
    "StrategyConfig": "dist_share.config.schema",
    "Strategy": "dist_share.distribute.strategies",
    "get_strategy": "dist_share.distribute.strategies",
    # training
    "Trainer": "dist_share.train.trainer",
    "CustomLoop": "dist_share.train.loops.custom",
    # a config turned into a run
    "RunInputs": "dist_share.run.inputs",
    "Run": "dist_share.run.session",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_share' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
