"""Keras 3 `model.fit` as a training loop, under every strategy, Horovod included.

A peer of `CustomLoop` on the same `TrainState`, `MetricsLogger` and `Evaluator`; why it reduces
gradients through the optimizer's hook: docs/DISTRIBUTED.md, "Custom loop vs model.fit".
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from dist_share.data.pipeline import train_input
from dist_share.data.types import DatasetFn
from dist_share.distribute.gradients import set_optimizer_reduction
from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError
from dist_share.train.compilation import OFF, jit_mode
from dist_share.train.evaluation import Evaluator
from dist_share.train.guards import nonfinite, preemption
from dist_share.train.logs import MetricsLogger
from dist_share.train.signals import StepTimes, learning_rate
from dist_share.train.state import TrainState

if TYPE_CHECKING:
    from dist_share.config.schema import Config


def distribute_optimizer(optimizer: keras.optimizers.Optimizer, strategy: Strategy) -> Any:
    """Make `optimizer.apply` reduce gradients through `strategy` (fit and custom loops alike).

    Keras fit divides the loss by the replicas of the tf.distribute strategy (1 under Horovod),
    so tf.distribute must SUM and Horovod must AVERAGE; the Horovod op is forced to 'average'.
    """
    options = dataclasses.replace(strategy.gradient_options, op="average")

    def reduce(grads_and_vars: Any) -> list[Any]:
        pairs = list(grads_and_vars)
        present = [i for i, (g, _) in enumerate(pairs) if g is not None]
        grads, _ = strategy.reduce_gradients([pairs[i][0] for i in present], options)
        for i, g in zip(present, grads, strict=True):
            pairs[i] = (g, pairs[i][1])
        return pairs

    return set_optimizer_reduction(optimizer, reduce)


class PerExampleLoss(keras.losses.Loss):
    """The ModelSpec loss as given: Keras's function wrapper would reshape labels to the
    predictions' rank first ([batch] -> [batch, 1]), which the contract's losses do not expect."""

    def __init__(self, fn: Any, name: str = "loss") -> None:
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.fn = fn

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.fn(y_true, y_pred)


class PerExampleMean(keras.metrics.Mean):
    """Mean of a ModelSpec metric (per-example values), again without label reshaping."""

    def __init__(self, fn: Any, name: str) -> None:
        super().__init__(name=name)
        self.fn = fn

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        return super().update_state(self.fn(y_true, y_pred), sample_weight=sample_weight)


class BroadcastInitialState(keras.callbacks.Callback):
    """Copy rank 0's model and optimizer state to every process before the first step.

    The optimizer is built first so that its slots exist and are broadcast too; otherwise ranks
    would create them lazily with possibly different values (e.g. after a partial restore).
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs: dict | None = None) -> None:
        opt = self.model.optimizer
        if not opt.built:
            opt.build(self.model.trainable_variables)
        self.strategy.broadcast_variables(list(self.model.variables) + list(opt.variables))


class RunCallback(keras.callbacks.Callback):
    """The run's step counter, logs, evaluation and checkpoints, on fit's schedule.

    Runs on every process: averaging the logs is a collective, and under MultiWorkerMirrored
    every worker takes part in a save. Writing is the logger's, which writes on the chief only.
    """

    def __init__(self, loop: FitLoop, start: int, eval_fn: DatasetFn | None = None) -> None:
        super().__init__()
        self.loop, self.start, self.step = loop, start, start
        tc = loop.config.training
        self.log_every = tc.log_every
        self.eval_every = tc.eval_every if eval_fn else 0
        self.ckpt_every = loop.config.checkpoint.every
        self.eval_fn = eval_fn
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.preempted: preemption.Preempted | None = None
        # fit's step gives no hook around its all-reduce, so there is no rank's own time here.
        self.step_times = StepTimes(loop.strategy, tc.batch_size, per_rank=False)
        self._t0 = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        state, logger = self.loop.state, self.loop.logger
        self.step_times.add(time.perf_counter() - self._t0, 0.0, 1)
        self.step = self.start + batch + 1
        state.global_step.assign(self.step)
        if self.step % self.log_every == 0 and logs:
            self.loop.last_logs = self._average(logs)
            self.loop.last_logs.update(
                self.step_times.interval(), learning_rate=learning_rate(state.optimizer)
            )
            logs.update(self.loop.last_logs)  # later (chief-only) callbacks see global values
            logger.log("train", self.step, self.loop.last_logs)
            if not logger.is_tty:  # on a terminal fit shows its own bar
                logger.show_progress(self.step, self.loop.last_logs, interval_end=True)
        if self.eval_every and self.step % self.eval_every == 0:
            # Between steps, every process together: the evaluator's loop and reductions.
            metrics = self.loop.evaluator.evaluate(self.eval_fn)
            logger.log("eval", self.step, {**metrics, **self.loop.evaluator.timing})
            self.last_eval = (self.step, metrics)
        # fit runs no code of ours between a step's gradient and its update, so a non-finite
        # loss can only stop the run (TrainState.save keeps non-finite values off the disk).
        # One small collective per step lets every process decide alike, for that and for
        # SIGTERM.
        loss = float(logs.get("loss", 0.0)) if logs else 0.0
        flags = preemption.agree(
            self.loop.strategy,
            {"nonfinite": not np.isfinite(loss), "stop": self.loop.preemption.requested},
        )
        if flags["nonfinite"]:
            raise nonfinite.NonFiniteError(
                nonfinite.describe(self.step, loss, None, state.latest_checkpoint())
            )
        if self.ckpt_every and self.step % self.ckpt_every == 0:
            state.save()
        elif flags["stop"] and self.step < self.loop.config.training.steps:
            self.preempted = self.loop.preemption.stop(
                self.step, state.save, state.checkpoint_directory
            )
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            self.loop.last_logs = self._average(logs)
            logs.update(self.loop.last_logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.preempted is None:  # a preempted run saved its step already
            self.loop.state.save()

    def _average(self, logs: dict) -> dict[str, float]:
        """Keras's logs are running means; where they are per process, average them."""
        values = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
        strategy = self.loop.strategy
        if not strategy.logs_are_per_process or strategy.world_size == 1:
            return values
        summed = strategy.allreduce_host_sum(values)
        return {k: v / strategy.world_size for k, v in summed.items()}


class FitLoop:
    """``training.loop: keras_fit``: the run's model, optimizer, data and checkpoints, driven by fit.

    Attributes:
        callbacks: extra Keras callbacks run on every process.
        chief_callbacks: extra callbacks run on the chief only (e.g. keras.callbacks.TensorBoard),
            after the logs have been averaged over processes.

    Raises:
        ConfigError: ``grad_accum_steps`` > 1 or ``steps_per_loop`` > 1 (fit has neither), or
            mixed precision under a strategy whose processes keep their own logs (Horovod):
            Keras's loss-scale check runs on the local gradient, before our allreduce, so ranks
            could take different branches and deadlock in the collective.
    """

    def __init__(
        self, state: TrainState, logger: MetricsLogger, evaluator: Evaluator, config: Config
    ) -> None:
        tc = config.training
        if tc.grad_accum_steps != 1:
            raise ConfigError(
                "training.grad_accum_steps", "keras_fit supports only 1; use loop: custom"
            )
        if tc.steps_per_loop != 1:
            raise ConfigError(
                "training.steps_per_loop", "keras_fit supports only 1; use loop: custom"
            )
        if tc.on_nonfinite == "skip":
            raise ConfigError(
                "training.on_nonfinite",
                "keras_fit can only stop at a non-finite loss (skip needs loop: custom)",
            )
        # keras_fit compiles its whole step, the collectives of the gradient reduction
        # included, which XLA cannot do with several replicas (CustomLoop compiles only the
        # replica's pass).
        self.jit_compile = jit_mode(tc.jit_compile, state.strategy) != OFF
        if self.jit_compile and state.strategy.num_replicas > 1:
            if tc.jit_compile == "true":
                raise ConfigError(
                    "training.jit_compile",
                    f"keras_fit cannot compile a step that reduces over "
                    f"{state.strategy.num_replicas} replicas; use loop: custom",
                )
            self.jit_compile = False
        self.state, self.logger, self.evaluator = state, logger, evaluator
        self.strategy = state.strategy
        self.config = config
        self.callbacks: list[keras.callbacks.Callback] = []
        self.chief_callbacks: list[keras.callbacks.Callback] = []
        self.last_logs: dict[str, float] = {}
        self.start_step = 0
        self.preemption = preemption.PreemptionGuard(self.strategy)

    def train(
        self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None = None
    ) -> dict[str, float]:
        """Train from the restored step to ``training.steps``; returns the final eval metrics."""
        state, strategy, steps = self.state, self.strategy, self.config.training.steps
        start = self.start_step = state.restore()
        self.logger.open(start)
        spec, model = state.spec, state.model
        with strategy.scope():
            distribute_optimizer(state.optimizer, strategy)
            model.compile(
                optimizer=state.optimizer,
                loss=PerExampleLoss(spec.loss),
                metrics=[PerExampleMean(fn, n) for n, fn in spec.metrics.items()],
                jit_compile=self.jit_compile,
            )
        data = strategy.distribute_dataset(train_input(train_dataset_fn, start, spec.stream_names))
        run = RunCallback(self, start, eval_dataset_fn)
        callbacks: list[keras.callbacks.Callback] = [
            BroadcastInitialState(strategy),
            run,
            *self.callbacks,
            *(self.chief_callbacks if strategy.is_chief else ()),
        ]
        show = strategy.is_chief and self.config.logging.progress_bar and self.logger.is_tty
        verbose = 1 if show else 0
        if steps > start:
            with self.preemption:
                self._fit(data, steps - start, callbacks, verbose)
        strategy.sync_non_trainable(model.non_trainable_variables)
        strategy.barrier()  # the chief's final checkpoint is complete before anyone reads it
        if run.preempted is not None:
            raise run.preempted
        if eval_dataset_fn is None:
            return {}
        if run.last_eval is not None and run.last_eval[0] == steps:
            return run.last_eval[1]
        metrics = self.evaluator.evaluate(eval_dataset_fn)
        self.logger.log("eval", steps, {**metrics, **self.evaluator.timing})
        return metrics

    def _fit(self, data: Any, steps: int, callbacks: list, verbose: int) -> None:
        # Keras 3 fit, for a model created under a tf.distribute scope, first opens an iterator
        # on the data for a "symbolic build" the already-built model does not need. A second
        # iterator on a dataset shuffled with reshuffle_each_iteration sees a *different*
        # permutation, so fit would not train on the batches the custom loop (or a resumed run)
        # sees. Without a recorded strategy Keras skips that step and takes the strategy from
        # the enclosing scope instead.
        model = self.state.model
        recorded = getattr(model, "_distribute_strategy", None)
        model._distribute_strategy = None
        if self.strategy.fit_logs_need_rank:
            # One-element logs reduce to the scalar mean over all replicas.
            step = model.train_step
            model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}
        try:
            with self.strategy.scope():
                model.fit(
                    data,
                    epochs=1,
                    steps_per_epoch=steps,
                    callbacks=callbacks,
                    verbose=verbose,
                    shuffle=False,  # the dataset function shuffles (seeded, before sharding)
                )
        finally:
            model._distribute_strategy = recorded
            model.__dict__.pop("train_step", None)


__all__ = ["BroadcastInitialState", "FitLoop", "RunCallback", "distribute_optimizer"]
