"""`CustomLoop`: the compiled train step, the same for every strategy, with orbit's hooks."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from dist_share.data.pipeline import train_input
from dist_share.data.types import DatasetFn
from dist_share.distribute.gradients import take_over_reduction
from dist_share.model import cross_replica
from dist_share.train.compilation import ReplicaPass, jit_mode
from dist_share.train.evaluation import Evaluator
from dist_share.train.guards import nonfinite, preemption
from dist_share.train.logs import MetricsLogger
from dist_share.train.loops import accumulate
from dist_share.train.profiling import ProfileWindow
from dist_share.train.signals import StepTimes, global_norm, learning_rate
from dist_share.train.state import TrainState

if TYPE_CHECKING:
    from dist_share.config.schema import Config


class CustomLoop:
    """A compiled train step, the same code for every strategy, with orbit's hooks.

    ``training.steps_per_loop`` steps run inside one compiled call (the data is read inside the
    loop and the logged sums are added up in the graph), so the per-call cost of a
    ``tf.function``, host reads and Python bookkeeping is paid once per loop. Logs, evaluation
    and checkpoints happen at loop boundaries; a loop is cut short to land on each of them.

    Override a hook in a subclass to change one piece: ``train_loop_begin``, ``train_step``,
    ``train_loop_end``.

    Raises:
        ConfigError: ``grad_accum_steps`` > 1 with a loss that couples rows and a model whose
            training forward has batch statistics or random draws (`accumulate.check_replayable`).
    """

    def __init__(
        self,
        state: TrainState,
        logger: MetricsLogger,
        evaluator: Evaluator,
        config: Config,
    ) -> None:
        self.state = state
        self.logger = logger
        self.evaluator = evaluator
        self.strategy = state.strategy
        self.config = config
        tc = config.training
        self.steps = tc.steps
        self.global_batch = tc.batch_size
        self.grad_accum = tc.grad_accum_steps
        if self.grad_accum > 1 and accumulate.couples_rows(state.spec.loss):
            accumulate.check_replayable(state.model)
        self.steps_per_loop = tc.steps_per_loop
        take_over_reduction(state.optimizer)
        # Loss denominator: Horovod with op=average averages, everything else sums.
        per_replica = self.global_batch // self.strategy.num_replicas
        self._loss_denominator = float(
            self.global_batch if self.strategy.gradient_op == "sum" else per_replica
        )
        self.on_nonfinite = tc.on_nonfinite
        # Mixed precision: the loss-scale optimizer already skips overflowed steps (and lowers
        # the scale); that is normal, so the guard then watches the loss only.
        self._guard_gradients = not tc.loss_scaled
        self.nonfinite_skipped = 0
        self.collective_wait = 0.0  # seconds this process waited in the last call's all-reduces
        self.stop_requested = False
        self.preemption = preemption.PreemptionGuard(self.strategy)
        self._train_fn: Any = None  # the compiled step, bound to one input iterator
        self._bound_iterator: Any = None
        self._out_keys: list[str] = []
        # The call's host-side inputs live in variables, assigned only when they change: tensor
        # arguments of a tf.function call cost Python time every step (benchmarks/call_costs.py).
        self._num_steps: tf.Variable | None = None
        self._stop_flag: tf.Variable | None = None
        self._inputs = (1, False)  # what the two variables hold
        self.last_logs: dict[str, float] = {}
        self.step_times = StepTimes(
            self.strategy,
            tc.batch_size,
            per_rank=not tc.deterministic,
            slow_rank_margin=config.logging.slow_rank_margin,
        )
        self.profile = ProfileWindow(tc.profile, state.run_dir, self.strategy)
        self.replica_pass = ReplicaPass(
            self._replica_gradients, jit_mode(tc.jit_compile, self.strategy), logger.note
        )

    # -- replica computations ------------------------------------------------------------
    def _replica_gradients(
        self, features: Any, labels: tf.Tensor
    ) -> tuple[list[Any], dict[str, tf.Tensor], list[tf.Tensor]]:
        """This replica's loss and gradients (the pass XLA may compile: `ReplicaPass`), and
        its waits in the collectives of batch-coupled layers and losses."""
        optimizer = self.state.optimizer

        def loss_of(per_example: tf.Tensor) -> tf.Tensor:
            return optimizer.scale_loss(tf.reduce_sum(per_example) / self._loss_denominator)

        # Op determinism forbids the clock (StepTimes says why it is read).
        with cross_replica.collective_waits(self.step_times.per_rank) as waits:
            grads, totals = accumulate.gradients(
                self.state.spec,
                features,
                labels,
                self.grad_accum,
                self.state.model.trainable_variables,
                loss_of,
            )
        return grads, totals, waits

    def _replica_train_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        model, optimizer = self.state.model, self.state.optimizer
        tvars = model.trainable_variables
        # This replica's time in collectives: those of batch-coupled layers and losses, and
        # the gradients' all-reduce (StepTimes says why).
        clock = self.step_times.per_rank
        grads, totals, waits = self.replica_pass(features, labels)
        with tf.control_dependencies(accumulate.tensors_of(grads)):
            ready = tf.timestamp() if clock else tf.constant(0.0, tf.float64)
        reduced, nbytes = self.strategy.reduce_gradients(grads)
        with tf.control_dependencies(accumulate.tensors_of(reduced)):
            waited = tf.add_n([tf.timestamp() - ready, *waits]) if clock else ready
        norm = global_norm(reduced)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            norm = norm / tf.cast(optimizer.dynamic_scale, tf.float32)  # read before apply
        # The reduced gradient is the same on every replica, so every replica decides alike.
        bad = (
            nonfinite.first_nonfinite(reduced)
            if self._guard_gradients
            else tf.constant(-1, tf.int32)
        )
        if self._guard_gradients and self.on_nonfinite == "skip":
            nonfinite.apply_if(optimizer, reduced, tvars, bad < 0)
        else:
            # stop: train_step raises on the host before anything is saved (docs/RELIABILITY.md
            # says why the update is not held back).
            optimizer.apply(reduced, tvars)
        flagged = bad >= 0
        totals["grad_norm"] = norm
        totals["norm_steps"] = tf.constant(1.0)
        if self.on_nonfinite == "skip":
            # A skipped step (or one whose local loss overflowed) is left out of the logged means.
            drop = tf.logical_or(flagged, tf.logical_not(tf.math.is_finite(totals["loss"])))
            drop = tf.logical_or(drop, tf.logical_not(tf.math.is_finite(norm)))
            totals = {k: tf.where(drop, tf.zeros_like(v), v) for k, v in totals.items()}
        # Ride along the logs' reduction (no extra collective): summed over the replicas, these
        # say whether the step was flagged and which variable was first (index + 1), and whether
        # any process was asked to stop (SIGTERM).
        totals["nonfinite_steps"] = tf.cast(flagged, tf.float32)
        totals["nonfinite_variable"] = tf.cast(bad + 1, tf.float32)
        totals["stop_requested"] = self._stop_flag.read_value()  # this process's flag
        totals["comm_bytes_per_step"] = tf.cast(nbytes, tf.float32)
        totals["collective_wait"] = tf.cast(waited, tf.float32)
        return totals

    def _one_step(self, iterator: Any) -> dict[str, tf.Tensor]:
        features, labels = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, (features, labels))
        # This process's own wait, not summed over the job: the longest of its replicas', and
        # its wait in the logs' reduction.
        waits = self.strategy.local_results(per_replica.pop("collective_wait"))
        wait = tf.reduce_max(tf.stack(waits))
        if self.step_times.per_rank:
            local = tf.nest.flatten([self.strategy.local_results(v) for v in per_replica.values()])
            with tf.control_dependencies(local):
                arrived = tf.timestamp()
        out = self.strategy.reduce_sum(per_replica)
        if self.step_times.per_rank:
            with tf.control_dependencies(tf.nest.flatten(out)):
                wait += tf.cast(tf.timestamp() - arrived, wait.dtype)
        out["collective_wait"] = tf.cast(wait, out["loss"].dtype)
        # Counted in the graph: a host-side assign per step costs more than the op.
        self.state.global_step.assign_add(1)
        return out

    # -- orbit's hooks -------------------------------------------------------------------
    def train_loop_begin(self) -> None:
        """Create the compiled step's host-side inputs (once)."""
        if self._num_steps is None:
            self._num_steps = tf.Variable(1, dtype=tf.int32, trainable=False, name="loop_steps")
            self._stop_flag = tf.Variable(0.0, trainable=False, name="stop_requested")

    def compiled_step(self, iterator: Any) -> Callable[[], tf.Tensor]:
        """The compiled loop over ``iterator``: a function of no arguments returning the summed
        logs as one vector (keys in ``self._out_keys``).

        The iterator is captured rather than passed, and the logs come back as one tensor:
        passing the iterator and tensors and reading each output costs Python time on every
        call (docs/PERFORMANCE.md). A new iterator (a new ``train`` call, an elastic reset)
        gets a new trace.
        """
        if self._train_fn is not None and self._bound_iterator is iterator:
            return self._train_fn
        self.train_loop_begin()
        stop_at_nonfinite = self.on_nonfinite == "stop"
        # With one step per call (the default) the loop is left out of the graph: even an
        # empty while loop costs time on every call (benchmarks/bench_overhead.py).
        looped = self.steps_per_loop > 1
        num_steps = self._num_steps

        @tf.function
        def train_fn() -> tf.Tensor:
            totals = self._one_step(iterator)
            if looped:
                for _ in tf.range(num_steps - 1):
                    # One step at a time: a step's collectives (Horovod names them) must not
                    # overlap the next step's, which a while loop's parallel iterations allow.
                    tf.autograph.experimental.set_loop_options(parallel_iterations=1)
                    if stop_at_nonfinite and totals["nonfinite_steps"] > 0:
                        break  # the same sum on every replica: all leave the loop together
                    totals = tf.nest.map_structure(tf.add, totals, self._one_step(iterator))
            self._out_keys = list(totals)
            return tf.stack([totals[k] for k in self._out_keys])

        self._train_fn, self._bound_iterator = train_fn, iterator
        return train_fn

    def train_step(self, iterator: Any, num_steps: int = 1) -> dict[str, float]:
        """``num_steps`` optimizer steps over global batches; returns their mean logs.

        Raises:
            NonFiniteError: ``on_nonfinite: stop`` and a step's reduced gradient or loss was
                not finite (the remaining steps of the call were not run, nothing was saved).
            ConfigError: ``training.jit_compile: true`` and the replica pass holds a collective.
        """
        train_fn = self.compiled_step(iterator)
        if num_steps != 1 and self.steps_per_loop == 1:
            raise ValueError(
                f"num_steps={num_steps}: the step was compiled for one step per call "
                f"(training.steps_per_loop: 1); set steps_per_loop to {num_steps} or more"
            )
        if self._inputs != (num_steps, self.preemption.requested):
            self._inputs = (num_steps, self.preemption.requested)
            self._num_steps.assign(num_steps)
            self._stop_flag.assign(float(self.preemption.requested))
        try:
            values = train_fn().numpy().tolist()  # the first call traces, setting _out_keys
        except cross_replica.CollectiveInCompiledPass:
            raise self.replica_pass.error() from None  # jit_compile: true on a coupled model
        out = dict(zip(self._out_keys, values, strict=True))
        replicas = self.strategy.num_replicas
        flagged = round(out.pop("nonfinite_steps") / replicas)
        variable = round(out.pop("nonfinite_variable") / replicas)
        self.stop_requested = out.pop("stop_requested") > 0
        count = out.pop("count")
        nbytes = out.pop("comm_bytes_per_step")
        self.collective_wait = out.pop("collective_wait")
        norm, normed = out.pop("grad_norm"), out.pop("norm_steps")
        logs = {k: v / count if count else float("nan") for k, v in out.items()}
        logs["comm_bytes_per_step"] = nbytes / (replicas * num_steps)
        logs["grad_norm"] = norm / normed if normed else float("nan")
        loss_ok = math.isfinite(out.get("loss", 0.0))
        if self.on_nonfinite == "skip":
            self.nonfinite_skipped += flagged
        elif flagged or not loss_ok:
            names = [v.path for v in self.state.model.trainable_variables]
            name = names[variable - 1] if flagged and 0 < variable <= len(names) else None
            raise nonfinite.NonFiniteError(
                nonfinite.describe(
                    self.state.step,
                    out.get("loss", float("nan")) / max(count, 1.0),
                    name,
                    self.state.latest_checkpoint(),
                )
            )
        return logs

    def train_loop_end(self) -> None:
        """Agree on local statistics, flush logs, and wait until the chief's final checkpoint
        is on disk before anyone reads it."""
        self.profile.close()
        self.strategy.sync_non_trainable(self.state.model.non_trainable_variables)
        self.logger.flush()
        self.strategy.barrier()

    # -- driver --------------------------------------------------------------------------
    def _next_boundary(self, step: int, eval_on: bool) -> int:
        """The next step at which something must happen outside the compiled loop."""
        tc, every = self.config.training, self.config.checkpoint.every
        candidates = [self.steps, step + self.steps_per_loop, *self.profile.boundaries(step)]
        for interval in (tc.log_every, tc.eval_every if eval_on else 0, every):
            if interval:
                candidates.append((step // interval + 1) * interval)
        return min(candidates)

    def train(
        self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None = None
    ) -> dict[str, float]:
        """Train from the restored step to ``training.steps``; returns the final eval metrics."""
        try:
            with self.preemption:
                return self._train(train_dataset_fn, eval_dataset_fn)
        finally:
            self.profile.close()
            self.release_input()

    def release_input(self) -> None:
        """Free the input iterator now, not at interpreter exit.

        The compiled step captures its iterator, so the iterator lives as long as the loop
        object. Left to Python's exit, tf.data's destructor can wait out its autotuning thread's
        current sleep, which doubles up to 60 s, so a finished run would linger after its last
        line (docs/PERFORMANCE.md). The collection breaks the tf.function's reference cycles,
        which hold the capture.
        """
        self._train_fn = self._bound_iterator = None
        gc.collect()

    def _train(self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None) -> dict:
        start = self.state.restore()
        self.start_step = start
        self.logger.open(start)
        result = self._train_from(start, train_dataset_fn, eval_dataset_fn)
        self.train_loop_end()
        slowest = self.step_times.slowest_rank()
        if slowest is not None:
            self.logger.note(slowest)
        return result

    def step_boundary(self, step: int) -> None:
        """Called at every loop boundary, after its logs, evaluation and checkpoint (elastic
        Horovod commits its state here)."""

    def _train_from(
        self, start: int, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None
    ) -> dict[str, float]:
        """The step loop from ``start``: its own input iterator, logs, eval and checkpoints."""
        tc = self.config.training
        names = self.state.spec.stream_names
        dist = self.strategy.distribute_dataset(train_input(train_dataset_fn, start, names))
        iterator = iter(dist)
        self.train_loop_begin()
        window: dict[str, float] = {}
        n_window = 0
        result: dict[str, float] = {}
        step = start
        eval_on = eval_dataset_fn is not None
        while step < self.steps:
            self.profile.at(step)
            n = self._next_boundary(step, eval_on) - step
            t0 = time.perf_counter()
            with self.profile.step(step):
                logs = self.train_step(iterator, n)
            self.step_times.add(time.perf_counter() - t0, self.collective_wait, n)
            if step == start:
                self.logger.log_graph(self.compiled_step(iterator).get_concrete_function().graph)
            step += n
            window = {k: window.get(k, 0.0) + v * n for k, v in logs.items()}
            n_window += n
            log_now = step % tc.log_every == 0 or step == self.steps
            self.logger.show_progress(step, logs, log_now)
            if log_now:
                self.last_logs = {k: v / n_window for k, v in window.items()}
                self.last_logs.update(self.interval_logs())
                self.logger.log("train", step, self.last_logs)
                window, n_window = {}, 0
            if eval_on and tc.eval_every and step % tc.eval_every == 0:
                result = self.evaluate(eval_dataset_fn, step)
            every = self.config.checkpoint.every
            if (every and step % every == 0) or step == self.steps:
                self.state.save()
            elif self.stop_requested:  # every process saw the same sum: all stop here
                stopped = self.preemption.stop(
                    step, self.state.save, self.state.checkpoint_directory
                )
                self.train_loop_end()  # nobody exits before the chief's checkpoint is on disk
                raise stopped
            self.step_boundary(step)
        self.profile.at(step)
        if eval_on and (not result or self.steps % max(tc.eval_every, 1)):
            result = self.evaluate(eval_dataset_fn, step)
        return result

    def interval_logs(self) -> dict[str, float]:
        """What a logging interval adds to the step's means: time and throughput (each rank's
        own, under several processes), the learning rate, and the skipped steps so far."""
        logs = self.step_times.interval()
        logs["learning_rate"] = learning_rate(self.state.optimizer)
        logs["nonfinite_skipped"] = float(self.nonfinite_skipped)
        return logs

    def evaluate(self, eval_dataset_fn: DatasetFn, step: int) -> dict[str, float]:
        metrics = self.evaluator.evaluate(eval_dataset_fn)
        self.logger.log("eval", step, {**metrics, **self.evaluator.timing})
        return metrics
