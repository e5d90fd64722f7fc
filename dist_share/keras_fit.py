"""Keras 3 `model.fit` under every strategy, Horovod included.

Horovod's own ``horovod.tensorflow.keras.DistributedOptimizer`` does not work with Keras 3 (it
calls ``.ref()`` on Keras 3 variables, which are not tf.Variables). Keras 3's TF optimizer has
one hook every gradient passes through in replica context before the update,
``_all_reduce_sum_gradients``; `distribute_optimizer` points it at `Strategy.reduce_gradients`,
so fit gets the same dedup / dense switch / compression / Horovod allreduce as the custom loop.
Initial state is broadcast from rank 0 once the optimizer has its slots; logs are averaged over
ranks; only the chief writes checkpoints, metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from dist_share import preemption
from dist_share.errors import ConfigError
from dist_share.strategies import DatasetFn, Strategy

if TYPE_CHECKING:
    from dist_share.training import Trainer


def distribute_optimizer(optimizer: keras.optimizers.Optimizer, strategy: Strategy) -> Any:
    """Make `optimizer.apply` reduce gradients through `strategy` (works under fit and custom loops).

    Keras fit divides the loss by the replicas of the tf.distribute strategy (1 under Horovod),
    so tf.distribute must SUM and Horovod must AVERAGE; the Horovod op is forced to 'average'.
    """
    options = dataclasses.replace(strategy.gradient_options, op="average")
    inner = getattr(optimizer, "inner_optimizer", optimizer)

    def reduce(grads_and_vars: Any) -> list[Any]:
        pairs = list(grads_and_vars)
        present = [i for i, (g, _) in enumerate(pairs) if g is not None]
        grads, _ = strategy.reduce_gradients(
            [pairs[i][0] for i in present], [pairs[i][1] for i in present], options
        )
        for i, g in zip(present, grads, strict=True):
            pairs[i] = (g, pairs[i][1])
        return pairs

    inner._all_reduce_sum_gradients = reduce
    return optimizer


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
    """Horovod: copy rank 0's model and optimizer state to every rank before the first step.

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


class TrainerBridge(keras.callbacks.Callback):
    """Step counter, rank-averaged logs, metrics.jsonl/TensorBoard (chief only), checkpoints.

    Runs on every rank: averaging the logs is a collective, and under MultiWorkerMirrored every
    worker takes part in a save. Writing is left to the trainer, which writes on the chief only.
    """

    def __init__(self, trainer: Trainer, start: int, eval_fn: DatasetFn | None = None) -> None:
        super().__init__()
        self.trainer, self.start, self.step = trainer, start, start
        self.log_every = int(trainer.config["training"]["log_every"] or 0)
        self.eval_every = int(trainer.config["training"]["eval_every"] or 0) if eval_fn else 0
        self.ckpt_every = int(trainer.config["checkpoint"]["every"] or 0)
        self.eval_fn = eval_fn
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.preemption = preemption.PreemptionGuard(trainer.strategy)
        self.preempted: int | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.preemption.install()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step = self.start + batch + 1
        self.trainer.global_step.assign(self.step)
        if self.log_every and self.step % self.log_every == 0 and logs:
            self.trainer.last_logs = self._average(logs)
            logs.update(self.trainer.last_logs)  # later (chief-only) callbacks see global values
            self.trainer._log("train", self.step, self.trainer.last_logs)
        if self.eval_every and self.step % self.eval_every == 0:
            # Between steps, every rank together: the trainer's own eval loop and reductions.
            self.last_eval = (self.step, self.trainer.evaluate(self.eval_fn, step=self.step))
        if self.ckpt_every and self.step % self.ckpt_every == 0:
            self.trainer.save()
        elif self.step < self.trainer.steps and self.preemption.should_stop():
            self.preempted = self.step  # issue 11: on_train_end saves; train() raises
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            self.trainer.last_logs = self._average(logs)
            logs.update(self.trainer.last_logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.preemption.uninstall()
        if self.preempted is not None:
            self.stopped = self.preemption.stop(
                self.preempted, self.trainer.save, self.trainer.checkpoint_directory
            )
            return
        self.trainer.save()

    def _average(self, logs: dict) -> dict[str, float]:
        """Keras's logs are this process's running means; Horovod ranks average them."""
        values = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
        strategy = self.trainer.strategy
        if strategy.name != "horovod" or strategy.world_size == 1:
            return values
        summed = strategy.allreduce_host_sum(values)
        return {k: v / strategy.world_size for k, v in summed.items()}


def train(
    trainer: Trainer,
    train_dataset_fn: DatasetFn,
    eval_dataset_fn: DatasetFn | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    chief_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, float]:
    """`training.loop: keras_fit`: the trainer's model, optimizer, data and checkpoints, driven by fit.

    `callbacks` run on every process; `chief_callbacks` (e.g. keras.callbacks.TensorBoard or
    ModelCheckpoint) only on the chief, after the logs have been averaged over ranks.
    """
    strategy = trainer.strategy
    if trainer.grad_accum != 1:
        raise ConfigError(
            "training.grad_accum_steps", "keras_fit supports only 1; use loop: custom"
        )
    if trainer.mixed_precision and strategy.name == "horovod":
        # LossScaleOptimizer checks finiteness on the *local* gradient before our allreduce, so
        # ranks could take different branches and deadlock in the collective.
        raise ConfigError(
            "training.mixed_precision", "not supported with loop: keras_fit under horovod"
        )
    start = trainer.start_step = trainer.restore()
    spec = trainer.spec
    with strategy.scope():
        distribute_optimizer(trainer.optimizer, strategy)
        trainer.model.compile(
            optimizer=trainer.optimizer,
            loss=PerExampleLoss(spec.loss),
            metrics=[PerExampleMean(fn, n) for n, fn in spec.metrics.items()],
            jit_compile=False,  # XLA cannot compile Horovod's ops
        )
    trainer._open_logs()
    data = strategy.distribute_dataset(trainer._train_input(train_dataset_fn, start))
    bridge = TrainerBridge(trainer, start, eval_dataset_fn)
    all_callbacks: list[keras.callbacks.Callback] = [
        BroadcastInitialState(strategy),
        bridge,
        *callbacks,
        *(chief_callbacks if strategy.is_chief else ()),
    ]
    verbose = 1 if strategy.is_chief and trainer.config["logging"]["progress_bar"] else 0
    if trainer.steps > start:
        # Keras 3 fit, for a model created under a tf.distribute scope, first opens an iterator
        # on the data for a "symbolic build" the already-built model does not need. A second
        # iterator on a dataset shuffled with reshuffle_each_iteration sees a *different*
        # permutation, so fit would not train on the batches the custom loop (or a resumed run)
        # sees. Without a recorded strategy Keras skips that step and takes the strategy from
        # the enclosing scope instead.
        model = trainer.model
        recorded = getattr(model, "_distribute_strategy", None)
        model._distribute_strategy = None
        if strategy.name == "multiworker":
            # Keras 3 reduces fit's logs across workers with reduce(MEAN, axis=0), which fails
            # on scalar logs; one-element logs reduce to the scalar mean over all replicas.
            step = model.train_step
            model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}
        try:
            with strategy.scope():
                model.fit(
                    data,
                    epochs=1,
                    steps_per_epoch=trainer.steps - start,
                    callbacks=all_callbacks,
                    verbose=verbose,
                    shuffle=False,  # the dataset function shuffles (seeded, before sharding)
                )
        finally:
            model._distribute_strategy = recorded
            model.__dict__.pop("train_step", None)
    strategy.sync_non_trainable(trainer.model.non_trainable_variables)
    strategy.barrier()  # the chief's final checkpoint is complete before anyone reads it
    if bridge.preempted is not None:
        raise bridge.stopped
    if eval_dataset_fn is None:
        return {}
    if bridge.last_eval is not None and bridge.last_eval[0] == trainer.steps:
        return bridge.last_eval[1]
    return trainer.evaluate(eval_dataset_fn, step=trainer.steps)


__all__ = ["BroadcastInitialState", "TrainerBridge", "distribute_optimizer", "train"]
