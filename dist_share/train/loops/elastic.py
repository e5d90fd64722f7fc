"""Elastic Horovod for Keras 3: a training state Horovod can commit, roll back and hand to
joiners, and `ElasticLoop`, the custom loop run inside Horovod's elastic retry loop.

What is committed and rebuilt: docs/DISTRIBUTED.md; why not Horovod's own
``TensorFlowKerasState`` and ``horovod.tensorflow.elastic.run``: docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dist_share.data.types import DatasetFn
from dist_share.distribute.strategies import tf_variables
from dist_share.errors import ConfigError, JobError
from dist_share.train.evaluation import Evaluator
from dist_share.train.logs import MetricsLogger
from dist_share.train.loops.custom import CustomLoop
from dist_share.train.state import TrainState

# What a TensorFlow error says when a Horovod collective failed because the job lost a worker
# (Gloo's connection to it broke, or Horovod's background loop shut down after that).
_COLLECTIVE_FAILURE = re.compile(
    r"Horovod has been shut down|gloo::|"
    r"Horovod\w*(?:Allreduce|Allgather|Broadcast|Alltoall|Reducescatter)",
    re.IGNORECASE,
)


def is_collective_failure(error: BaseException) -> bool:
    """A TensorFlow op error raised because a Horovod collective lost its peers."""
    import tensorflow as tf

    if not isinstance(error, tf.errors.OpError):
        return False
    return bool(_COLLECTIVE_FAILURE.search(str(getattr(error, "message", "") or error)))


@contextlib.contextmanager
def _rollback_on_collective_failure() -> Iterator[None]:
    """Raise a collective failure as ``HorovodInternalError``, Horovod's rollback signal;
    every other error propagates unchanged."""
    try:
        yield
    except Exception as e:
        if not is_collective_failure(e):
            raise
        from horovod.common.exceptions import HorovodInternalError

        raise HorovodInternalError(e) from e


def variables_checksum(variables: Sequence[Any]) -> float:
    """Sum of squares of every value, in float64 and in the given order (equal variables give
    bit-equal checksums on every worker)."""
    return float(sum(np.sum(np.square(np.asarray(v.numpy(), np.float64))) for v in variables))


def make_state(
    model: Any,
    optimizer: Any,
    extra_variables: Sequence[Any] = (),
    **attributes: Any,
) -> Any:
    """A `KerasTrainState` for ``model`` and ``optimizer`` (built first, so its slots exist).

    Args:
        model: a built Keras 3 model.
        optimizer: a Keras 3 optimizer; built here on the trainable variables if it is not.
        extra_variables: more variables to commit/restore/broadcast (e.g. a step counter).
        **attributes: plain Python values committed with the state (``step=0``, ``epoch=0``).

    Raises:
        ImportError: Horovod is not installed.
    """
    import horovod.tensorflow as hvd

    class KerasTrainState(hvd.elastic.ObjectState):
        """Commit = meet every worker, then host copies of every variable; restore = assign
        them back; sync = broadcast from rank 0 (the variables, then Horovod's broadcast of the
        Python attributes)."""

        def __init__(self) -> None:
            self.model, self.optimizer = model, optimizer
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            self.extra_variables = list(extra_variables)
            self._snapshot: list[np.ndarray] | None = None
            self.commits = 0
            self.restores = 0
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **attributes)
            self._save_variables()

        def variables(self) -> list[Any]:
            return (
                list(self.model.variables) + list(self.optimizer.variables) + self.extra_variables
            )

        def _save_variables(self) -> None:
            self._snapshot = [np.array(v.numpy(), copy=True) for v in self.variables()]

        def commit(self) -> None:
            # Horovod's commit saves first and meets the other workers after (in its host-update
            # broadcast). A worker whose peer died between the step's last collective and the
            # commit would then save a step that peer never finished: the chief killed before
            # writing the step's record, say, and the survivor rolls back to a step missing
            # from metrics.jsonl. Meeting first makes a commit a point every worker reached.
            import tensorflow as tf

            hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="dist_share_commit_barrier")
            super().commit()

        def save(self) -> None:
            self._save_variables()
            self.commits += 1
            super().save()

        def restore(self) -> None:
            for v, value in zip(self.variables(), self._snapshot or [], strict=True):
                v.assign(value)
            self.restores += 1
            super().restore()

        def sync(self) -> None:
            # A worker lost during the sync is a failure like any other: roll back and re-form.
            with _rollback_on_collective_failure():
                hvd.broadcast_variables(tf_variables(self.variables()), root_rank=0)
                self._save_variables()
                super().sync()

    return KerasTrainState()


def run(train: Callable[..., Any], state: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``train(state, ...)`` until it returns, rolling back / re-forming the job whenever
    workers leave or join (Horovod's ``run_fn`` with TensorFlow's reset).

    ``train`` must rebuild anything that depends on the number of workers (the data shards,
    the per-worker batch, compiled functions that captured ``hvd.size()``) each time it is
    entered, and call ``state.commit()`` every few steps (the rollback point, and where joins
    happen). A TensorFlow error of a failed Horovod collective becomes ``HorovodInternalError``
    (the rollback signal); every other error propagates.
    """
    import horovod.tensorflow as hvd
    from horovod.common.elastic import run_fn

    def reset() -> None:
        hvd.shutdown()
        hvd.init()

    def translated(state: Any, *a: Any, **kw: Any) -> Any:
        with _rollback_on_collective_failure():
            return train(state, *a, **kw)

    return run_fn(translated, reset)(state, *args, **kwargs)


class ElasticLoop(CustomLoop):
    """`CustomLoop` under elastic Horovod: the step loop runs inside `run`.

    * Committed (host copies, the rollback point): every model and optimizer variable, the
      global step, and the count of skipped non-finite steps; every
      ``strategy.horovod.commit_every`` steps and at every checkpoint (a loop is cut short to
      land on each), so a rollback never goes behind a checkpoint on disk.
    * Rebuilt each time the job is (re-)formed, from the committed step: the input iterator
      (each worker's shard of the global batch), the loss denominator and the compiled step
      (both captured the number of workers). ``training.batch_size`` is the global batch
      whatever the number of workers, so it must split over every size the job takes.
    * Logs: the chief of the current membership (rank 0 may change process) rewrites
      metrics.jsonl without the records after the committed step, so each step is there once;
      an ``"split": "elastic"`` record says how many workers there are from that step and how
      many steps were redone. Checkpoints are written by the current rank 0.

    The framework's heartbeat watchdog is not run (`survives_lost_workers`): Horovod's elastic
    driver handles lost workers, and the survivors must not be aborted.
    """

    survives_lost_workers = True

    def __init__(
        self,
        state: TrainState,
        logger: MetricsLogger,
        evaluator: Evaluator,
        config: Any,
    ) -> None:
        if not hasattr(state.strategy, "hvd"):
            raise ConfigError(
                "strategy.horovod.elastic", "elastic training needs strategy.name: horovod"
            )
        if config.training.loop != "custom":
            raise ConfigError(
                "strategy.horovod.elastic",
                "elastic Horovod runs the custom loop; set training.loop: custom "
                "(Keras fit has no point at which the state could be committed)",
            )
        if config.optimizer.scale_lr_by_world_size:
            raise ConfigError(
                "optimizer.scale_lr_by_world_size",
                "cannot be used with strategy.horovod.elastic: the number of workers changes "
                "while the job runs (the global batch, and so the learning rate, does not)",
            )
        super().__init__(state, logger, evaluator, config)
        self.commit_every = config.strategy.horovod.commit_every
        self._show_progress = config.logging.progress_bar
        self._elastic_state: Any = None
        self._last_step = 0
        self.entries = 0

    # -- where the loop stops ------------------------------------------------------------
    def _commits_at(self, step: int) -> bool:
        every = self.config.checkpoint.every
        return step % self.commit_every == 0 or bool(every and step % every == 0)

    def _next_boundary(self, step: int, eval_on: bool) -> int:
        commit = (step // self.commit_every + 1) * self.commit_every
        return min(super()._next_boundary(step, eval_on), commit)

    def step_boundary(self, step: int) -> None:
        self._last_step = step
        if step < self.steps and self._commits_at(step):
            self._elastic_state.nonfinite_skipped = self.nonfinite_skipped
            self._elastic_state.commit()  # may raise HostsUpdatedInterrupt: a worker joins

    def train_step(self, iterator: Any, num_steps: int = 1) -> dict[str, float]:
        logs = super().train_step(iterator, num_steps)
        logs["workers"] = float(self.strategy.world_size)
        return logs

    # -- driver --------------------------------------------------------------------------
    def _train(self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None) -> dict:
        # No broadcast here: the first thing `run` does is sync every worker from rank 0, and
        # a worker joining a running job must meet the others there, with no collective before.
        start = self.state.restore(broadcast=False)
        self.start_step = self._last_step = start
        self._elastic_state = make_state(
            self.state.model,
            self.state.optimizer,
            extra_variables=[self.state.global_step],
            nonfinite_skipped=self.nonfinite_skipped,
        )
        result = run(self._enter, self._elastic_state, train_dataset_fn, eval_dataset_fn)
        self.train_loop_end()
        self._check_in_sync()
        return result

    def _check_in_sync(self) -> None:
        """End by proving every worker holds the same variables (one allreduce of two numbers):
        the job was re-formed from broadcasts and rollbacks, and a silent divergence would be
        exported as if it were the model. The checksum goes to metrics.jsonl."""
        import tensorflow as tf

        hvd = self.strategy.hvd
        local = variables_checksum(self.state.model.variables)
        high, neg_low = hvd.allreduce(
            tf.constant([local, -local], tf.float64), op=hvd.Max, name="dist_share_in_sync"
        ).numpy()
        spread = float(high + neg_low)
        size = self.strategy.world_size
        self.logger.log(
            "elastic",
            self.state.step,
            {"workers": float(size), "variables_checksum": local, "checksum_spread": spread},
        )
        if spread != 0.0:
            raise JobError(
                f"the {size} workers of the elastic job ended with different variables "
                f"(checksums differ by {spread:.6g}; this rank {self.strategy.rank}: {local!r}); "
                "the last checkpoint is rank 0's"
            )

    def _enter(
        self, elastic_state: Any, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None
    ) -> dict[str, float]:
        """One (re-)formation of the job: rebuild what depends on the workers, then train."""
        hvd = self.strategy.hvd
        size = self.strategy.world_size
        self._check_split(size)
        per_replica = self.global_batch // size
        self._loss_denominator = float(
            self.global_batch if self.strategy.gradient_op == "sum" else per_replica
        )
        self._train_fn = None  # retraced by compiled_step: the old one captured the old size
        self.step_times.reset()  # the ranks are numbered anew
        self.nonfinite_skipped = elastic_state.nonfinite_skipped
        step = self.state.step
        # Steps trained since the commit this job rolled back to, by whoever got furthest
        # (0 for a joiner or after a join, which happens at a commit).
        import tensorflow as tf

        local = float(max(0, self._last_step - step)) if self.entries else 0.0
        redone = int(hvd.allreduce(tf.constant(local), op=hvd.Max, name="dist_share_redone"))
        self._reopen_logs(step)
        self.logger.log("elastic", step, {"workers": float(size), "steps_redone": float(redone)})
        if self.strategy.is_chief and self.entries:
            print(
                f"dist-share: elastic reset: {size} worker(s) from step {step} "
                f"({redone} step(s) redone since the last commit)",
                file=sys.stderr,
                flush=True,
            )
        self.entries += 1
        self._last_step = step
        return self._train_from(step, train_dataset_fn, eval_dataset_fn)

    def _check_split(self, size: int) -> None:
        batch, accum = self.global_batch, self.grad_accum
        if batch % size or (batch // size) % accum:
            error = ConfigError(
                "training.batch_size",
                f"the global batch {batch} (in {accum} micro-batches per worker) does not split "
                f"over the {size} workers the elastic job now has; choose a batch_size that "
                "every worker count between horovodrun's --min-np and --max-np divides "
                "(times training.grad_accum_steps)",
            )
            # Met mid-training: the CLI must keep the run directory and its checkpoints.
            error.found_while_training = True
            raise error

    def _reopen_logs(self, step: int) -> None:
        """Logs written by the chief of the job as it is now, from the committed ``step``."""
        chief = self.strategy.is_chief
        if self.entries == 0 and chief == self.logger.is_chief:
            self.logger.open(step)
            return
        self.logger.close()
        self.logger.is_chief = chief
        self.logger.progress = self._show_progress and chief
        self.logger.open(step, resume=True)  # drops the records after the committed step
