"""The data contract: what a source yields and what a dataset function is."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

SPLITS = ("train", "eval")
# ({stream name: [n, ...] array}, labels [n]): every in-memory source's examples.
Arrays = tuple[dict[str, np.ndarray], np.ndarray]
# What `tf.distribute.Strategy.distribute_datasets_from_function` takes.
DatasetFn = Callable[["tf.distribute.InputContext"], "tf.data.Dataset"]


def split_rng(split_seed: int, *salt: int) -> np.random.Generator:
    """The generator a source draws with: a function of the split seed only, never of the rank."""
    return np.random.default_rng([int(split_seed), *salt])
