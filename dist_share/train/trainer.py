"""`Trainer`: a run of a config (state, logs, evaluator, and the loop the config names).

Batch semantics, the gradient reduction and the loops are described in docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from dist_share.data.types import DatasetFn
from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError
from dist_share.train.evaluation import Evaluator
from dist_share.train.guards import watchdog
from dist_share.train.logs import MetricsLogger, flat_hparams
from dist_share.train.loops.custom import CustomLoop
from dist_share.train.loops.elastic import ElasticLoop
from dist_share.train.loops.fit import FitLoop
from dist_share.train.optimizer import configure_process
from dist_share.train.state import TrainState

if TYPE_CHECKING:
    from dist_share.config.schema import Config, TrainingConfig
    from dist_share.families.build import ModelSpec

LOOPS: dict[str, type] = {"custom": CustomLoop, "keras_fit": FitLoop}


class Trainer:
    """A run of a config: its state, logs, evaluator and the loop ``training.loop`` names.

    Args:
        build_spec: called in ``strategy.scope()``; returns a `ModelSpec`-like object.
        strategy: from `strategies.get_strategy`, built first thing in the process.
        config: the run's `Config`; ``optimizer``, ``training``, ``checkpoint`` and ``logging``
            are read (the model section is `build_spec`'s business).
        run_dir: where checkpoints, metrics.jsonl and TensorBoard go; None keeps nothing.
        loop: the loop class, if not the one ``training.loop`` names (e.g. a `CustomLoop`
            subclass that overrides a hook).
        extra_evaluation: more metrics at each evaluation (`Evaluator`'s ``extra``).

    Raises:
        ConfigError: the global batch does not split over the replicas and micro-batches.
    """

    def __init__(
        self,
        build_spec: Callable[[], ModelSpec],
        strategy: Strategy,
        config: Config,
        run_dir: str | os.PathLike | None = None,
        loop: type | None = None,
        extra_evaluation: Callable[[Any, list[str]], dict[str, float]] | None = None,
    ) -> None:
        check_batch(config.training, strategy.num_replicas)
        configure_process(config.training)
        self.config = config
        self.strategy = strategy
        self.state = TrainState(build_spec, strategy, config, run_dir)
        self.logger = MetricsLogger(
            run_dir,
            strategy.is_chief,
            config.training.steps,
            tensorboard=config.logging.tensorboard,
            progress=config.logging.progress_bar,
            hparams=flat_hparams(config.to_dict()),
        )
        self.evaluator = Evaluator(self.state, config.training.eval_batches, extra_evaluation)
        loop_cls = loop or loop_class(config)
        self.loop = loop_cls(self.state, self.logger, self.evaluator, config)

    @property
    def model(self) -> keras.Model:
        return self.state.model

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.state.optimizer

    @property
    def global_step(self) -> tf.Variable:
        return self.state.global_step

    @property
    def last_logs(self) -> dict[str, float]:
        return self.loop.last_logs

    @property
    def start_step(self) -> int:
        return getattr(self.loop, "start_step", 0)

    def train(
        self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None = None
    ) -> dict[str, float]:
        """Train to ``training.steps`` (resuming from the last checkpoint); final eval metrics.

        With several processes and a run directory, every process beats a heartbeat file there
        and watches the others' (`watchdog.Heartbeat`): a peer that dies or freezes ends this
        process within ``training.stall_timeout`` seconds, naming the peer (exit 3). Not under
        elastic Horovod: there the survivors of a lost worker roll back and go on.

        Raises:
            PeerLost: a collective failed because another process died or stopped answering.
            Preempted: SIGTERM; every process stopped at the same step and it was saved.
            NonFiniteError: ``training.on_nonfinite: stop`` met a non-finite loss or gradient.
        """
        heartbeat = None
        # Elastic Horovod carries on without a lost worker: no watchdog may end the survivors.
        elastic = getattr(self.loop, "survives_lost_workers", False)
        if self.state.run_dir is not None and not elastic:
            heartbeat = watchdog.Heartbeat(
                self.state.run_dir,
                self.strategy.rank,
                self.strategy.world_size,
                self.config.training.stall_timeout,
            ).start()
        try:
            return self.loop.train(train_dataset_fn, eval_dataset_fn)
        except Exception as e:
            lost = watchdog.as_peer_lost(e, self.strategy.rank)
            if lost is None:
                raise
            raise lost from None
        finally:
            if heartbeat is not None:
                heartbeat.stop()

    def evaluate(self, eval_dataset_fn: DatasetFn, step: int | None = None) -> dict[str, float]:
        """Evaluate the current model and log the result at ``step`` (default: the current one)."""
        self.logger.open(self.state.step, resume=False)
        metrics = self.evaluator.evaluate(eval_dataset_fn)
        step = self.state.step if step is None else step
        self.logger.log("eval", step, {**metrics, **self.evaluator.timing})
        return metrics

    def restore(self) -> int:
        return self.state.restore()

    def save(self) -> str | None:
        return self.state.save()

    def close(self) -> None:
        self.logger.close()


def loop_class(config: Config) -> type:
    """The loop a config trains with: `ElasticLoop` for ``strategy.horovod.elastic``
    under Horovod, else the one ``training.loop`` names."""
    if config.strategy.name == "horovod" and config.strategy.horovod.elastic:
        return ElasticLoop
    return LOOPS[config.training.loop]


def check_batch(training: TrainingConfig, num_replicas: int) -> None:
    """The global batch must split evenly over the replicas and each replica's micro-batches."""
    n, batch, accum = num_replicas, training.batch_size, training.grad_accum_steps
    if batch % n:
        raise ConfigError(
            "training.batch_size",
            f"global batch {batch} must be a positive multiple of the {n} replicas",
        )
    if (batch // n) % accum:
        raise ConfigError(
            "training.grad_accum_steps",
            f"per-replica batch {batch // n} must split into {accum} equal micro-batches",
        )
