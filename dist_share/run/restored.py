"""A run directory's model restored from its newest checkpoint, and its towers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError
from dist_share.families.base import Tower
from dist_share.families.registry import get_family
from dist_share.run import directory as rundir
from dist_share.run.session import Run
from dist_share.train.trainer import Trainer

# A model alone in this process, in float32: what exports and embeddings are made from.
ONE_PROCESS = (
    "strategy.name=local",
    "strategy.num_cpu_devices=null",
    "training.precision=float32",
)


def latest_checkpoint(run_dir: Path) -> str | None:
    return tf.train.latest_checkpoint(str(run_dir / "checkpoints"))


class RestoredRun:
    """A run directory's config, strategy and model at its newest checkpoint.

    Args:
        run_dir: a directory written by ``dist-share train``.
        purpose: what the model is restored for, in the error (``export``, ``embed``, ...).
        overrides: ``KEY=VALUE`` settings over the saved config (the strategy, say).

    Raises:
        ConfigError: ``run_dir`` is not a run directory, or has no checkpoint.
    """

    def __init__(self, run_dir: Path, purpose: str, overrides: Sequence[str] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = rundir.read_config(self.run_dir, [*overrides, "checkpoint.resume=true"])
        if latest_checkpoint(self.run_dir) is None:
            raise ConfigError(
                "RUN_DIR",
                f"{run_dir} has no checkpoint to {purpose} "
                f"(expected {self.run_dir / 'checkpoints'})",
            )
        self.run = Run(self.cfg)
        self.trainer: Trainer = self.run.trainer(self.run_dir)
        self.step = self.trainer.restore()  # reads the run; nothing here writes metrics
        self.family = get_family(self.cfg.model.family)

    @property
    def strategy(self) -> Strategy:
        return self.run.strategy

    @property
    def streams(self) -> list[str]:
        return self.trainer.state.spec.stream_names

    def tower_names(self) -> list[str]:
        return self.family.tower_names(self.cfg.model, self.streams)

    def tower(self, name: str) -> Tower:
        """Tower ``name``; a ConfigError listing the towers if there is none of that name."""
        names = self.tower_names()
        if name not in names:
            raise ConfigError(
                "--tower",
                f"{self.cfg.model.family} models have no tower {name!r}; "
                f"the towers are {', '.join(names)}",
            )
        with self.strategy.scope():
            return self.family.build_tower(self.trainer.model, self.cfg.model, self.streams, name)

    def close(self) -> None:
        self.trainer.close()
