"""Retrieval evaluation of a run's model over its eval split (``evaluate --retrieval``,
``training.retrieval_eval``)."""

from __future__ import annotations

from typing import Any

from dist_share.config.schema import Config
from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError
from dist_share.families.base import RetrievalTask, Tower
from dist_share.families.registry import get_family
from dist_share.retrieval.evaluate import evaluate_retrieval
from dist_share.run.inputs import load_arrays

PREFIX = "retrieval/"


class RetrievalPass:
    """Retrieval metrics of a model over the eval split, keyed ``retrieval/<metric>``.

    The split is read (and the task built) once; the towers are cut from whichever model is
    passed in, so the pass can run at every evaluation of a training run.

    Raises:
        ConfigError: the eval split is streamed from TFRecord shards, or has no classes to
            judge a gallery by (`families.base.Family.retrieval_task`).
    """

    def __init__(
        self, cfg: Config, strategy: Strategy, key: str = "--retrieval", index: str | None = None
    ) -> None:
        if cfg.data.source == "tfrecord":
            raise ConfigError(
                key,
                "retrieval evaluation reads the eval split into memory; data.source tfrecord "
                "is streamed (embed it with `dist-share embed` instead)",
            )
        self.cfg, self.strategy, self.index = cfg, strategy, index
        self.family = get_family(cfg.model.family)
        self.arrays = load_arrays(cfg.data, "eval")
        self._task: RetrievalTask | None = None

    def towers(self, model: Any, streams: list[str]) -> tuple[Tower, Tower]:
        names = self.family.retrieval_towers(self.cfg.model, streams)
        with self.strategy.scope():
            return tuple(  # type: ignore[return-value]
                self.family.build_tower(model, self.cfg.model, streams, n) for n in names
            )

    def __call__(self, model: Any, streams: list[str]) -> dict[str, float]:
        towers = self.towers(model, streams)
        if self._task is None:
            self._task = self.family.retrieval_task(
                self.cfg.data, self.cfg.model, "eval", self.arrays, towers
            )
        metrics = evaluate_retrieval(self.strategy, self._task, *towers, index=self.index)
        return {PREFIX + k: v for k, v in metrics.items()}
