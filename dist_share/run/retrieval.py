"""Retrieval evaluation of a run's model over its eval split (``evaluate --retrieval``,
``training.retrieval_eval``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_share.config.schema import Config
from dist_share.data.types import Arrays
from dist_share.distribute.strategies import Strategy
from dist_share.families.base import RetrievalTask, Tower
from dist_share.families.registry import get_family
from dist_share.retrieval.evaluate import evaluate_retrieval
from dist_share.run.inputs import load_arrays, record_source

PREFIX = "retrieval/"


def eval_arrays(cfg: Config) -> Arrays:
    """The eval split in memory (TFRecord shards read once, in file order)."""
    if cfg.data.source != "tfrecord":
        return load_arrays(cfg.data, "eval")
    source = record_source(cfg.data, "eval")
    batches = list(source.dataset_fn(4096, training=False)(None).as_numpy_iterator())
    features = {k: np.concatenate([f[k] for f, _ in batches]) for k in batches[0][0]}
    return features, np.concatenate([labels for _, labels in batches])


class RetrievalPass:
    """Retrieval metrics of a model over the eval split, keyed ``retrieval/<metric>``.

    The split is read (and the task built) once; the towers are cut from whichever model is
    passed in, so the pass can run at every evaluation of a training run.

    Raises:
        ConfigError: the eval split has no classes to judge a gallery by
            (`families.base.Family.retrieval_task`).
    """

    def __init__(self, cfg: Config, strategy: Strategy, index: str | None = None) -> None:
        self.cfg, self.strategy, self.index = cfg, strategy, index
        self.family = get_family(cfg.model.family)
        self.arrays = eval_arrays(cfg)
        self._task: RetrievalTask | None = None
        self._towers: tuple[Any, tuple] | None = None

    def towers(self, model: Any, streams: list[str]) -> tuple[Tower, Tower]:
        """The query and corpus towers of ``model``, cut once per model (they share its
        weights, so a training run's later evaluations see the trained values)."""
        if self._towers is None or self._towers[0] is not model:
            names = self.family.retrieval_towers(self.cfg.model, streams)
            with self.strategy.scope():
                cut = tuple(
                    self.family.build_tower(model, self.cfg.model, streams, n) for n in names
                )
            self._towers = (model, cut)
        return self._towers[1]  # type: ignore[return-value]

    def __call__(self, model: Any, streams: list[str]) -> dict[str, float]:
        towers = self.towers(model, streams)
        if self._task is None:
            self._task = self.family.retrieval_task(
                self.cfg.data, self.cfg.model, "eval", self.arrays, towers
            )
        metrics = evaluate_retrieval(self.strategy, self._task, *towers, index=self.index)
        return {PREFIX + k: v for k, v in metrics.items()}
