"""Training: the state a run keeps, the logs it writes, and the loops that drive it.

The shape follows TF Model Garden's orbit: the pieces a loop needs are small public objects,
and a loop is a peer built on them, strategy-agnostic:

* `TrainState`: the model, its optimizer and the step counter, and their checkpoints;
* `MetricsLogger`: metrics.jsonl, TensorBoard and the console (chief only);
* `Evaluator`: one pass over the eval split, reduced over every replica;
* `CustomLoop`: a compiled step with orbit's hooks (``train_loop_begin``, ``train_step``,
  ``train_loop_end``) that runs ``training.steps_per_loop`` steps per call;
* `keras_fit.FitLoop`: the same state, logs and evaluation driven by Keras ``model.fit``.

`Trainer` puts them together for a config; the CLI, the examples and the tests use it.

Batch semantics: ``training.batch_size`` is the GLOBAL batch. Each replica gets
batch_size / num_replicas examples per step and splits them into ``grad_accum_steps``
micro-batches. The per-example loss is summed and divided by the global batch (or by the
replica batch when Horovod averages), so the reduced gradient is the gradient of the mean loss
over the global batch, whatever the number of replicas.

The custom loop reduces gradients itself (`Strategy.reduce_gradients`, after sparse dedup) and
then applies them with an optimizer whose built-in cross-replica sum is off; clipping therefore
sees the global gradient and ``comm_bytes_per_step`` is what was really handed to the collective.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from dist_share.data.pipeline import check_element_spec, train_input
from dist_share.distribute.gradients import take_over_reduction
from dist_share.distribute.strategies import DatasetFn, Strategy
from dist_share.errors import ConfigError, DataError, JobError
from dist_share.run import directory as rundir
from dist_share.train.guards import nonfinite, preemption, watchdog
from dist_share.train.loops import fit as keras_fit

if TYPE_CHECKING:
    from dist_share.config.schema import Config, OptimizerConfig, TrainingConfig
    from dist_share.families.build import ModelSpec

log = logging.getLogger(__name__)

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()


def make_optimizer(cfg: OptimizerConfig, num_replicas: int = 1) -> keras.optimizers.Optimizer:
    """The optimizer of ``optimizer.*``; the learning rate is scaled by replicas only when asked."""
    lr = cfg.learning_rate * (num_replicas if cfg.scale_lr_by_world_size else 1)
    common: dict[str, Any] = {"learning_rate": lr}
    if cfg.clipnorm is not None:
        common["clipnorm"] = cfg.clipnorm
    if cfg.weight_decay is not None:
        common["weight_decay"] = cfg.weight_decay
    if cfg.name == "sgd":
        return keras.optimizers.SGD(momentum=cfg.momentum, **common)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=cfg.momentum, **common)
    if cfg.name == "adamw":
        common.setdefault("weight_decay", 0.004)
    return {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "adagrad": keras.optimizers.Adagrad,
    }[cfg.name](**common)


def configure_process(training: TrainingConfig) -> None:
    """Process-wide settings a run depends on: the seed, op determinism, the precision policy.

    Keras and TensorFlow keep these as globals, so they are set once, before the model exists.
    """
    if training.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(training.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if training.mixed_precision else "float32"
    )


# -- state ---------------------------------------------------------------------------------
class TrainState:
    """The model, its optimizer and the step counter, created in the strategy's scope, and
    their checkpoints: everything a resumed run needs.

    The model's variables are listed explicitly in the checkpoint: tf.train.Checkpoint(model=...)
    does not see Keras 3 layers that hold sublayers in Python lists (SharedTower's weight sets,
    or any user layer built that way), so it would save neither their weights nor their
    batch-norm statistics. The list is in model.variables order, which depends only on the
    architecture, not on layer names.

    Args:
        build_spec: called in ``strategy.scope()``; returns a `models.ModelSpec`-like object
            (``model``, per-example ``loss``, ``metrics``, ``stream_names``).
        strategy: where the replicas live.
        config: the run's config; ``optimizer``, ``training`` and ``checkpoint`` are read.
        run_dir: checkpoints go to ``run_dir/checkpoints``; None keeps nothing on disk.
    """

    def __init__(
        self,
        build_spec: Callable[[], ModelSpec],
        strategy: Strategy,
        config: Config,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        self.strategy = strategy
        self.checkpoint_config = config.checkpoint
        self.run_dir = Path(run_dir) if run_dir is not None else None
        with strategy.scope():
            self.spec = build_spec()
            self.model: keras.Model = self.spec.model
            opt = make_optimizer(config.optimizer, strategy.num_replicas)
            if config.training.mixed_precision:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            self.optimizer = opt
            self.optimizer.build(self.model.trainable_variables)
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self._checkpoint = tf.train.Checkpoint(
            model_variables=list(self.model.variables),
            optimizer=self.optimizer,
            step=self.global_step,
        )
        self._manager: tf.train.CheckpointManager | None = None

    @property
    def step(self) -> int:
        return int(self.global_step.numpy())

    @property
    def checkpoint_directory(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def save(self) -> str | None:
        """Save on the chief (and, under MultiWorkerMirrored, scratch saves on the others).

        Every process calls this at the same step, so the collectives inside line up.
        CheckpointManager writes the shards under temporary names, renames them, and only then
        rewrites the 'checkpoint' index (itself written to a temp file and renamed), so a crash
        mid-save leaves the index pointing at the previous, complete checkpoint.
        """
        if self.checkpoint_directory is None:
            return None
        self.strategy.sync_non_trainable(self.model.non_trainable_variables)
        # Never let a NaN checkpoint push the good ones out of the kept set. The state is the
        # same on every process, so every process raises alike (before any collective save).
        bad = nonfinite.first_nonfinite_variable(
            list(self.model.variables) + list(self.optimizer.variables)
        )
        if bad is not None:
            raise nonfinite.NonFiniteError(
                nonfinite.describe(
                    self.step, None, bad, self.latest_checkpoint(), after_update=True
                )
            )
        target = self.strategy.checkpoint_dir(str(self.checkpoint_directory))
        if target is None:
            return None
        if self._manager is None or self._manager.directory != target:
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, target, max_to_keep=self.checkpoint_config.keep
            )
        path = rundir.save_checkpoint(self._manager, self.step)
        self.strategy.cleanup_checkpoint_dir(target)
        return path if self.strategy.is_chief else None

    def latest_checkpoint(self) -> str | None:
        """The name of the newest complete checkpoint (``ckpt-200``), or None."""
        if self.checkpoint_directory is None:
            return None
        latest = tf.train.latest_checkpoint(str(self.checkpoint_directory))
        return Path(latest).name if latest else None

    def restore(self, broadcast: bool = True) -> int:
        """Restore the newest readable checkpoint (older ones if the newest is damaged), make
        every process's state the chief's (unless ``broadcast`` is False: elastic Horovod
        broadcasts in its own sync, which a joining worker must meet first), return the step."""
        directory = self.checkpoint_directory
        if directory is not None and self.checkpoint_config.resume:
            state = tf.train.get_checkpoint_state(str(directory))
            paths = list(state.all_model_checkpoint_paths) if state else []
            errors = []
            for path in reversed(paths):
                try:
                    self._checkpoint.restore(path).assert_existing_objects_matched()
                    log.info("resumed from %s", path)
                    break
                except Exception as e:  # a torn file fails in the reader in many ways
                    log.warning("checkpoint %s unreadable (%s); trying an older one", path, e)
                    errors.append(f"{path}: {e}")
            else:
                if paths:
                    raise JobError(
                        "no readable checkpoint in "
                        f"{directory} (set checkpoint.resume: false to start over):\n"
                        + "\n".join(errors)
                    )
        # Horovod: make rank 0's state (restored or freshly initialised) everyone's.
        if broadcast:
            self.strategy.broadcast_variables(
                list(self.model.variables) + list(self.optimizer.variables) + [self.global_step]
            )
        return self.step


# -- logs ----------------------------------------------------------------------------------
def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity; strict parsers reject Python's bare tokens, so they become null."""
    return value if math.isfinite(value) else None


class MetricsLogger:
    """What a run shows and keeps: metrics.jsonl, TensorBoard, and the console. Chief only.

    On a terminal the console gets Keras's progress bar; anywhere else (a Slurm output file,
    ``kubectl logs``) one plain line per logging interval, since a bar's carriage-return frames
    would fill the file. Lines carry the rank when ``rank`` is given.

    Args:
        run_dir: where metrics.jsonl and tensorboard/ go; None: console only.
        is_chief: only the chief writes anything.
        total_steps: the run's length, for the progress bar and the ETA.
        tensorboard: write TensorBoard scalars.
        progress: show progress on the console.
        stream: the console (default sys.stdout); decides between the bar and plain lines.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None,
        is_chief: bool,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        stream: Any = None,
        rank: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_chief = is_chief
        self.total_steps = total_steps
        self.tensorboard = tensorboard
        self.progress = progress and is_chief
        self.stream = stream if stream is not None else sys.stdout
        self.prefix = f"[rank {rank}] " if rank is not None else ""
        self._file = None
        self._writer = None
        self._opened = False
        self._bar: keras.utils.Progbar | None = None
        self._t_start = 0.0
        self._step_start = 0

    def open(self, start_step: int, resume: bool = True) -> None:
        """Start (or continue) the run's logs at ``start_step``; later calls do nothing.

        With ``resume``, records of steps after ``start_step`` were written by a run that died
        before its next checkpoint; they are dropped, so that metrics.jsonl holds each step once.
        """
        if self._opened:
            return
        self._opened = True
        self._t_start, self._step_start = time.perf_counter(), start_step
        if not self.is_chief or self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume and path.exists():
            self._drop_records_after(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if self.tensorboard:
            self._writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))

    @staticmethod
    def _drop_records_after(path: Path, step: int) -> None:
        from dist_share.files import atomic_write_text

        lines = path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    @property
    def is_tty(self) -> bool:
        """The console is a terminal: progress is a bar, not plain lines."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def log(self, split: str, step: int, values: Mapping[str, float]) -> None:
        """Append one record to metrics.jsonl and TensorBoard (and, for eval, the console)."""
        if not self.is_chief:
            return
        if split != "train" and self.progress and not self.is_tty:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            print(f"{self.prefix}{split} step {step}: {shown}", file=self.stream, flush=True)
        if self._file is None:
            return
        record: dict[str, Any] = {"split": split, "step": int(step), "time": time.time()}
        record.update({k: _finite_or_none(float(v)) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            with self._writer.as_default():
                for k, v in values.items():
                    # tf.summary.scalar needs the tensorboard package; the scalar plugin's
                    # metadata written by hand gives TensorBoard the same event without it.
                    tf.summary.write(
                        f"{split}/{k}", tf.constant(float(v)), step=step, metadata=_SCALAR_METADATA
                    )

    def show_progress(self, step: int, logs: Mapping[str, float], interval_end: bool) -> None:
        """The console: the bar on every update, a plain line at the end of each interval."""
        if not self.progress:
            return
        if self.is_tty:
            if self._bar is None:
                self._bar = keras.utils.Progbar(
                    self.total_steps, stateful_metrics=["comm_bytes_per_step"]
                )
                self._bar.update(self._step_start)
            self._bar.update(step, values=list(logs.items()))
            return
        if not interval_end:
            return
        elapsed = time.perf_counter() - self._t_start
        done = step - self._step_start
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        shown = " ".join(
            f"{k}={v:.4g}" for k, v in logs.items() if k not in ("comm_bytes_per_step",)
        )
        print(
            f"{self.prefix}step {step}/{self.total_steps} {shown} eta={eta:.0f}s",
            file=self.stream,
            flush=True,
        )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._opened = False
        self._bar = None


# -- evaluation ----------------------------------------------------------------------------
class Evaluator:
    """Mean loss and metrics over the eval split, the same on every process.

    Hooks: ``eval_begin``, ``eval_step``, ``eval_end`` (orbit's names).

    Args:
        state: whose model is evaluated.
        eval_batches: stop after this many batches per input pipeline; None: the whole split.
    """

    def __init__(self, state: TrainState, eval_batches: int | None = None) -> None:
        self.state = state
        self.strategy = state.strategy
        self.eval_batches = eval_batches
        self._eval_fn = None

    def _replica_eval_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        return forward(self.state.spec, features, labels, training=False)[1]

    def eval_begin(self) -> dict[str, float]:
        if self._eval_fn is None:

            @tf.function(reduce_retracing=True)
            def eval_fn(batch: Any) -> Any:
                return self.strategy.eval_sum(self.strategy.run(self._replica_eval_step, batch))

            self._eval_fn = eval_fn
        return {}

    def eval_step(self, batch: Any, state: dict[str, float]) -> dict[str, float]:
        for k, v in self._eval_fn(batch).items():
            state[k] = state.get(k, 0.0) + float(v)
        return state

    def eval_end(self, state: dict[str, float]) -> dict[str, float]:
        state = self.strategy.allreduce_host_sum(state)
        count = state.pop("count", 0.0)
        if not count:
            raise DataError("evaluation saw no examples (empty eval split or eval_batches=0)")
        return {k: v / count for k, v in state.items()}

    def evaluate(self, eval_dataset_fn: DatasetFn) -> dict[str, float]:
        """One pass over the split; every process must call it (it reduces across them)."""
        limit = self.eval_batches
        names = self.state.spec.stream_names

        def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = eval_dataset_fn(ctx)
            check_element_spec(ds.element_spec, names)
            return ds.take(limit) if limit is not None else ds

        self.strategy.sync_non_trainable(self.state.model.non_trainable_variables)
        state = self.eval_begin()
        for batch in self.strategy.distribute_dataset(fn):
            state = self.eval_step(batch, state)
        return self.eval_end(state)


def forward(spec: ModelSpec, features: Any, labels: tf.Tensor, training: bool) -> tuple:
    """(per-example loss, {loss, metrics and count summed over the batch}) of one batch."""
    preds = spec.model(features, training=training)
    per_example = tf.cast(spec.loss(labels, preds), tf.float32)
    sums = {"loss": tf.reduce_sum(per_example)}
    for name, fn in spec.metrics.items():
        sums[name] = tf.reduce_sum(tf.cast(fn(labels, preds), tf.float32))
    sums["count"] = tf.cast(tf.shape(per_example)[0], tf.float32)
    return per_example, sums


# -- the custom loop -----------------------------------------------------------------------
def _add_grads(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.concat([a.values, b.values], 0), tf.concat([a.indices, b.indices], 0), a.dense_shape
        )
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def _grad_tensors(grads: list[Any]) -> list[tf.Tensor]:
    out = []
    for g in grads:
        if isinstance(g, tf.IndexedSlices):
            out.extend([g.values, g.indices])
        elif g is not None:
            out.append(g)
    return out


class CustomLoop:
    """A compiled train step, the same code for every strategy, with orbit's hooks.

    ``training.steps_per_loop`` steps run inside one compiled call (the data is read inside the
    loop and the logged sums are added up in the graph), so the per-call cost of a
    ``tf.function``, host reads and Python bookkeeping is paid once per loop. Logs, evaluation
    and checkpoints happen at loop boundaries; a loop is cut short to land on each of them.

    Override a hook in a subclass to change one piece: ``train_loop_begin``, ``train_step``,
    ``train_loop_end``.
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
        self._guard_gradients = not tc.mixed_precision
        self.nonfinite_skipped = 0
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

    # -- replica computations ------------------------------------------------------------
    def _replica_train_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        model, optimizer = self.state.model, self.state.optimizer
        tvars = model.trainable_variables
        k = self.grad_accum
        if k == 1:
            micro = [(features, labels)]
        else:
            parts = [tf.split(t, k, axis=0) for t in tf.nest.flatten(features)]
            ys = tf.split(labels, k, axis=0)
            micro = [
                (tf.nest.pack_sequence_as(features, [p[i] for p in parts]), ys[i]) for i in range(k)
            ]
        grads: list[Any] = [None] * len(tvars)
        totals: dict[str, tf.Tensor] = {}
        for f, y in micro:
            # Micro-batch i+1 starts after i's gradients exist, so only one is live at a time.
            with tf.control_dependencies(_grad_tensors(grads)), tf.GradientTape() as tape:
                per_example, sums = forward(self.state.spec, f, y, training=True)
                loss = tf.reduce_sum(per_example) / self._loss_denominator
                loss = optimizer.scale_loss(loss)
            step_grads = tape.gradient(loss, tvars)
            grads = [_add_grads(a, b) for a, b in zip(grads, step_grads, strict=True)]
            totals = {n: totals.get(n, 0.0) + v for n, v in sums.items()}
        reduced, nbytes = self.strategy.reduce_gradients(grads)
        # The reduced gradient is the same on every replica, so every replica decides alike.
        bad = (
            nonfinite.first_nonfinite(reduced)
            if self._guard_gradients
            else tf.constant(-1, tf.int32)
        )
        if self._guard_gradients and self.on_nonfinite == "skip":
            nonfinite.apply_if(optimizer, reduced, tvars, bad < 0)
        else:
            # stop: train_step raises on the host before anything is saved (nonfinite.py says
            # why the update is not held back).
            optimizer.apply(reduced, tvars)
        flagged = bad >= 0
        if self.on_nonfinite == "skip":
            # A skipped step (or one whose local loss overflowed) is left out of the logged means.
            drop = tf.logical_or(flagged, tf.logical_not(tf.math.is_finite(totals["loss"])))
            totals = {k: tf.where(drop, tf.zeros_like(v), v) for k, v in totals.items()}
        # Ride along the logs' reduction (no extra collective): summed over the replicas, these
        # say whether the step was flagged and which variable was first (index + 1), and whether
        # any process was asked to stop (SIGTERM).
        totals["nonfinite_steps"] = tf.cast(flagged, tf.float32)
        totals["nonfinite_variable"] = tf.cast(bad + 1, tf.float32)
        totals["stop_requested"] = self._stop_flag.read_value()  # this process's flag
        totals["comm_bytes_per_step"] = tf.cast(nbytes, tf.float32)
        return totals

    def _one_step(self, iterator: Any) -> dict[str, tf.Tensor]:
        features, labels = next(iterator)
        out = self.strategy.reduce_sum(
            self.strategy.run(self._replica_train_step, (features, labels))
        )
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

        The iterator is captured rather than passed, and the logs come back as one tensor: on
        this machine the old form (iterator and two tensors passed, 8 outputs read as floats)
        cost 275-380 us more per call than this one, against a ~10 ms step
        (benchmarks/call_costs.py). A new iterator (a new ``train`` call, an elastic reset)
        gets a new trace.
        """
        if self._train_fn is not None and self._bound_iterator is iterator:
            return self._train_fn
        self.train_loop_begin()
        stop_at_nonfinite = self.on_nonfinite == "stop"
        # With one step per call (the default) the loop is left out of the graph: an empty
        # while loop still cost ~0.5 ms of a ~11 ms step here (benchmarks/bench_overhead.py).
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
        values = train_fn().numpy().tolist()  # the first call traces, setting _out_keys
        out = dict(zip(self._out_keys, values, strict=True))
        replicas = self.strategy.num_replicas
        flagged = round(out.pop("nonfinite_steps") / replicas)
        variable = round(out.pop("nonfinite_variable") / replicas)
        self.stop_requested = out.pop("stop_requested") > 0
        count = out.pop("count")
        nbytes = out.pop("comm_bytes_per_step")
        logs = {k: v / count if count else float("nan") for k, v in out.items()}
        logs["comm_bytes_per_step"] = nbytes / (replicas * num_steps)
        loss_ok = math.isfinite(out.get("loss", 0.0))
        if self.on_nonfinite == "skip":
            self.nonfinite_skipped += flagged
            logs["nonfinite_skipped"] = float(self.nonfinite_skipped)
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
        self.strategy.sync_non_trainable(self.state.model.non_trainable_variables)
        self.logger.flush()
        self.strategy.barrier()

    # -- driver --------------------------------------------------------------------------
    def _next_boundary(self, step: int, eval_on: bool) -> int:
        """The next step at which something must happen outside the compiled loop."""
        tc, every = self.config.training, self.config.checkpoint.every
        candidates = [self.steps, step + self.steps_per_loop]
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
            self.release_input()

    def release_input(self) -> None:
        """Free the input iterator now, not at interpreter exit.

        The compiled step captures its iterator, so the iterator lives as long as the loop
        object. Left to Python's exit, tf.data's destructor can wait out its autotuning thread's
        current sleep, which doubles up to 60 s: a finished 6000-step run here lingered 51 s
        after its last line, against 3.4 s with this (``python -m benchmarks.exit_time``). The
        collection breaks the tf.function's reference cycles, which hold the capture.
        """
        self._train_fn = self._bound_iterator = None
        gc.collect()

    def _train(self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None) -> dict:
        start = self.state.restore()
        self.start_step = start
        self.logger.open(start)
        result = self._train_from(start, train_dataset_fn, eval_dataset_fn)
        self.train_loop_end()
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
        n_window, t0 = 0, time.perf_counter()
        result: dict[str, float] = {}
        step = start
        eval_on = eval_dataset_fn is not None
        while step < self.steps:
            n = self._next_boundary(step, eval_on) - step
            logs = self.train_step(iterator, n)
            step += n
            window = {k: window.get(k, 0.0) + v * n for k, v in logs.items()}
            n_window += n
            log_now = step % tc.log_every == 0 or step == self.steps
            self.logger.show_progress(step, logs, log_now)
            if log_now:
                dt = time.perf_counter() - t0
                self.last_logs = {k: v / n_window for k, v in window.items()}
                self.last_logs["examples_per_sec"] = n_window * self.global_batch / max(dt, 1e-9)
                self.logger.log("train", step, self.last_logs)
                window, n_window, t0 = {}, 0, time.perf_counter()
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
        if eval_on and (not result or self.steps % max(tc.eval_every, 1)):
            result = self.evaluate(eval_dataset_fn, step)
        return result

    def evaluate(self, eval_dataset_fn: DatasetFn, step: int) -> dict[str, float]:
        metrics = self.evaluator.evaluate(eval_dataset_fn)
        self.logger.log("eval", step, metrics)
        return metrics


# -- putting it together ----------------------------------------------------------------------
LOOPS: dict[str, type] = {"custom": CustomLoop, "keras_fit": keras_fit.FitLoop}


class Trainer:
    """A run of a config: its state, logs, evaluator and the loop ``training.loop`` names.

    Args:
        build_spec: called in ``strategy.scope()``; returns a `models.ModelSpec`-like object.
        strategy: from `strategies.get_strategy`, built first thing in the process.
        config: the run's `Config`; ``optimizer``, ``training``, ``checkpoint`` and ``logging``
            are read (the model section is `build_spec`'s business).
        run_dir: where checkpoints, metrics.jsonl and TensorBoard go; None keeps nothing.
        loop: the loop class, if not the one ``training.loop`` names (e.g. a `CustomLoop`
            subclass that overrides a hook).

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
        )
        self.evaluator = Evaluator(self.state, config.training.eval_batches)
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
        self.logger.log("eval", self.state.step if step is None else step, metrics)
        return metrics

    def restore(self) -> int:
        return self.state.restore()

    def save(self) -> str | None:
        return self.state.save()

    def close(self) -> None:
        self.logger.close()


def loop_class(config: Config) -> type:
    """The loop a config trains with: `elastic.ElasticLoop` for ``strategy.horovod.elastic``
    under Horovod, else the one ``training.loop`` names."""
    if config.strategy.name == "horovod" and config.strategy.horovod.elastic:
        from dist_share.train.loops.elastic import ElasticLoop

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
