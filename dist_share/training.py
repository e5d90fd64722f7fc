"""The custom loop: one strategy-agnostic trainer with orbit-like hooks, checkpoints and logs.

Batch semantics: ``training.batch_size`` is the GLOBAL batch. Each replica gets
batch_size / num_replicas examples per step and splits them into ``grad_accum_steps``
micro-batches. The per-example loss is summed and divided by the global batch (or by the
replica batch when Horovod averages), so the reduced gradient is the gradient of the mean loss
over the global batch, whatever the number of replicas.

The trainer reduces gradients itself (`Strategy.reduce_gradients`, after sparse dedup) and then
applies them with an optimizer whose built-in cross-replica sum is off; clipping therefore
sees the global gradient and `comm_bytes_per_step` is what was really handed to the collective.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from dist_share import nonfinite, preemption, rundir
from dist_share.config import OPTIMIZERS, runtime_defaults
from dist_share.errors import ConfigError, DataError, JobError
from dist_share.gradients import take_over_reduction
from dist_share.strategies import DatasetFn, Strategy

log = logging.getLogger(__name__)

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()

DEFAULTS: dict[str, dict[str, Any]] = runtime_defaults()


class ModelSpecLike(Protocol):
    model: keras.Model
    loss: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    metrics: dict[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]
    stream_names: list[str]


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill keys a partial config leaves out with the documented defaults (resolved configs pass through)."""

    def merge(default: Any, given: Any) -> Any:
        if isinstance(default, dict) and isinstance(given, Mapping):
            out = {
                k: merge(v, given.get(k, v)) if k in given else copy.deepcopy(v)
                for k, v in default.items()
            }
            out.update({k: v for k, v in given.items() if k not in default})
            return out
        return given

    return merge(DEFAULTS, dict(config or {}))


def make_optimizer(opt_cfg: Mapping[str, Any], num_replicas: int = 1) -> keras.optimizers.Optimizer:
    """Optimizer from ``optimizer.*``; the learning rate is scaled by replicas only when asked."""
    name = str(opt_cfg.get("name", "adam")).lower()
    lr = float(opt_cfg.get("learning_rate", 0.001))
    if opt_cfg.get("scale_lr_by_world_size"):
        lr *= num_replicas
    common: dict[str, Any] = {"learning_rate": lr}
    if opt_cfg.get("clipnorm") is not None:
        common["clipnorm"] = float(opt_cfg["clipnorm"])
    if opt_cfg.get("weight_decay") is not None:
        common["weight_decay"] = float(opt_cfg["weight_decay"])
    momentum = float(opt_cfg.get("momentum") or 0.0)
    if name == "sgd":
        return keras.optimizers.SGD(momentum=momentum, **common)
    if name == "adam":
        return keras.optimizers.Adam(**common)
    if name == "adamw":
        common.setdefault("weight_decay", 0.004)
        return keras.optimizers.AdamW(**common)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=momentum, **common)
    if name == "adagrad":
        return keras.optimizers.Adagrad(**common)
    raise ConfigError("optimizer.name", f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


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


class Trainer:
    """Custom tf.function loop, the same code for every strategy.

    Hooks (override in a subclass to change one piece): ``train_loop_begin``, ``train_step``,
    ``train_loop_end``, ``eval_begin``, ``eval_step``, ``eval_end``.
    """

    def __init__(
        self,
        build_spec: Callable[[], ModelSpecLike],
        strategy: Strategy,
        config: Mapping[str, Any] | None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = resolve_config(config)
        self.strategy = strategy
        self.run_dir = Path(run_dir) if run_dir is not None else None
        tc = self.config["training"]
        self.steps = int(tc["steps"])
        self.global_batch = int(tc["batch_size"])
        self.grad_accum = int(tc["grad_accum_steps"])
        self._check_batch()
        if tc["deterministic"]:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(int(tc["seed"]))
        self.mixed_precision = bool(tc["mixed_precision"])
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if self.mixed_precision else "float32"
        )
        with strategy.scope():
            self.spec = build_spec()
            self.model: keras.Model = self.spec.model
            opt = make_optimizer(self.config["optimizer"], strategy.num_replicas)
            if self.mixed_precision:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            self.optimizer = take_over_reduction(opt)
            self.optimizer.build(self.model.trainable_variables)
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # Loss denominator: Horovod with op=average averages, everything else sums.
        self._loss_denominator = float(
            self.global_batch if strategy.gradient_op == "sum" else self.per_replica_batch
        )
        # The model's variables are listed explicitly: tf.train.Checkpoint(model=...) does not
        # see Keras 3 layers that hold sublayers in Python lists (SharedTower's weight sets, or
        # any user layer built that way), so it would save neither their weights nor their
        # batch-norm statistics. The list is in model.variables order, which depends only on
        # the architecture, not on layer names.
        self._checkpoint = tf.train.Checkpoint(
            model_variables=list(self.model.variables),
            optimizer=self.optimizer,
            step=self.global_step,
        )
        self._manager: tf.train.CheckpointManager | None = None
        self._writer = None
        self._train_fn = None
        self._eval_fn = None
        self._metrics_file = None
        self.last_logs: dict[str, float] = {}
        # issue 11: the non-finite guard (dist_share/nonfinite.py)
        self.on_nonfinite = str(tc.get("on_nonfinite", "stop"))
        self.nonfinite_skipped = 0
        self.start_step = 0
        # Extra Keras callbacks for `training.loop: keras_fit` (every process / chief only).
        self.fit_callbacks: list[keras.callbacks.Callback] = []
        self.fit_chief_callbacks: list[keras.callbacks.Callback] = []

    # -- batch semantics ---------------------------------------------------------------------
    @property
    def per_replica_batch(self) -> int:
        return self.global_batch // self.strategy.num_replicas

    def _check_batch(self) -> None:
        n = self.strategy.num_replicas
        if self.global_batch <= 0 or self.global_batch % n:
            raise ConfigError(
                "training.batch_size",
                f"global batch {self.global_batch} must be a positive multiple of the {n} replicas",
            )
        if self.grad_accum < 1 or (self.global_batch // n) % self.grad_accum:
            raise ConfigError(
                "training.grad_accum_steps",
                f"per-replica batch {self.global_batch // n} must split into "
                f"{self.grad_accum} equal micro-batches",
            )

    def _check_features(self, element_spec: Any) -> None:
        features = element_spec[0] if isinstance(element_spec, tuple) else element_spec
        if not isinstance(features, Mapping):
            raise DataError(f"dataset elements must be (features_dict, labels), got {element_spec}")
        names = set(self.spec.stream_names)
        missing, extra = names - set(features), set(features) - names
        if missing or extra:
            raise DataError(
                f"dataset streams do not match the model: missing {sorted(missing)}, extra {sorted(extra)}"
            )

    def _train_input(self, dataset_fn: DatasetFn, start_step: int) -> DatasetFn:
        """Repeat, and skip what a resumed run already consumed.

        Skipping is per input pipeline: one pipeline feeds num_replicas / num_pipelines replicas.
        """

        def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = dataset_fn(ctx)
            self._check_features(ds.element_spec)
            ds = ds.repeat()
            per_pipeline = max(1, ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines))
            return ds.skip(start_step * per_pipeline) if start_step else ds

        return fn

    # -- replica computations ----------------------------------------------------------------
    def _forward(self, features: Any, labels: tf.Tensor, training: bool) -> tuple[tf.Tensor, dict]:
        preds = self.model(features, training=training)
        per_example = tf.cast(self.spec.loss(labels, preds), tf.float32)
        sums = {"loss": tf.reduce_sum(per_example)}
        for name, fn in self.spec.metrics.items():
            sums[name] = tf.reduce_sum(tf.cast(fn(labels, preds), tf.float32))
        sums["count"] = tf.cast(tf.shape(per_example)[0], tf.float32)
        return per_example, sums

    def _replica_train_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        tvars = self.model.trainable_variables
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
                per_example, sums = self._forward(f, y, training=True)
                loss = tf.reduce_sum(per_example) / self._loss_denominator
                loss = self.optimizer.scale_loss(loss)
            step_grads = tape.gradient(loss, tvars)
            grads = [_add_grads(a, b) for a, b in zip(grads, step_grads, strict=True)]
            totals = {n: totals.get(n, 0.0) + v for n, v in sums.items()}
        reduced, nbytes = self.strategy.reduce_gradients(grads, tvars)
        if self.mixed_precision:  # the loss-scale optimizer skips overflowed steps itself
            self.optimizer.apply(reduced, tvars)
            bad = tf.constant(-1, tf.int32)
        else:  # the same decision on every replica: the reduced gradient is the same
            bad = nonfinite.first_nonfinite(reduced)
            nonfinite.apply_if(self.optimizer, reduced, tvars, bad < 0)
        totals["nonfinite_grad"] = tf.cast(bad >= 0, tf.float32)
        totals["nonfinite_var"] = tf.cast(bad + 1, tf.float32)
        totals["comm_bytes_per_step"] = tf.cast(nbytes, tf.float32)
        return totals

    def _replica_eval_step(self, features: Any, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._forward(features, labels, training=False)[1]

    # -- orbit-like hooks --------------------------------------------------------------------
    def train_loop_begin(self) -> None:
        """Build the compiled step once; open logs on the chief."""
        if self._train_fn is None:

            @tf.function
            def train_fn(iterator: Any) -> dict[str, tf.Tensor]:
                features, labels = next(iterator)
                out = self.strategy.run(self._replica_train_step, (features, labels))
                # Counted in the graph: a host-side assign per step costs more than the op.
                self.global_step.assign_add(1)
                return self.strategy.reduce_sum(out)

            self._train_fn = train_fn
        self._open_logs()

    def train_step(self, iterator: Any) -> dict[str, float]:
        """One optimizer step over one global batch; returns averaged host-side numbers."""
        out = {k: float(v) for k, v in self._train_fn(iterator).items()}
        count = out.pop("count")
        n = self.strategy.num_replicas
        self._nonfinite = (out.pop("nonfinite_grad") / n, int(round(out.pop("nonfinite_var") / n)))
        logs = {k: v / count for k, v in out.items() if k != "comm_bytes_per_step"}
        logs["comm_bytes_per_step"] = out["comm_bytes_per_step"] / self.strategy.num_replicas
        return logs

    def _guard_nonfinite(self, step: int, logs: dict[str, float]) -> bool:
        """Stop (raise) or count a step whose loss or reduced gradient was not finite."""
        flagged, index = self._nonfinite
        loss = logs.get("loss", 0.0)
        if not flagged and np.isfinite(loss):
            return False
        if self.on_nonfinite == "skip":
            self.nonfinite_skipped += 1
            return True
        variables = self.model.trainable_variables
        name = variables[index - 1].path if flagged and 0 < index <= len(variables) else None
        latest = None
        if self.checkpoint_directory is not None:
            latest = tf.train.latest_checkpoint(str(self.checkpoint_directory))
        raise nonfinite.NonFiniteError(
            nonfinite.describe(step, loss, name, Path(latest).name if latest else None)
        )

    def train_loop_end(self) -> None:
        """Agree on local statistics, flush logs, and wait until the chief's final checkpoint is
        on disk before anyone reads it."""
        self.strategy.sync_non_trainable(self.model.non_trainable_variables)
        if self._writer is not None:
            self._writer.flush()
        self.strategy.barrier()

    def eval_begin(self) -> dict[str, float]:
        if self._eval_fn is None:

            @tf.function(reduce_retracing=True)
            def eval_fn(batch: Any) -> Any:
                out = self.strategy.run(self._replica_eval_step, batch)
                return self.strategy.eval_sum(out)

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

    # -- public API --------------------------------------------------------------------------
    def train(
        self, train_dataset_fn: DatasetFn, eval_dataset_fn: DatasetFn | None = None
    ) -> dict[str, float]:
        """Train to ``training.steps`` (resuming from the last checkpoint) and return final eval metrics."""
        if self.config["training"]["loop"] == "keras_fit":
            from dist_share import keras_fit

            return keras_fit.train(
                self,
                train_dataset_fn,
                eval_dataset_fn,
                callbacks=self.fit_callbacks,
                chief_callbacks=self.fit_chief_callbacks,
            )
        if self.config["training"]["loop"] != "custom":
            raise ConfigError(
                "training.loop",
                f"expected custom or keras_fit, got {self.config['training']['loop']!r}",
            )
        start = self.start_step = self.restore()
        tc = self.config["training"]
        log_every, eval_every = int(tc["log_every"] or 0), int(tc["eval_every"] or 0)
        ckpt_every = int(self.config["checkpoint"]["every"] or 0)
        dist = self.strategy.distribute_dataset(self._train_input(train_dataset_fn, start))
        iterator = iter(dist)
        self.train_loop_begin()
        progbar = None
        if self.strategy.is_chief and self.config["logging"]["progress_bar"]:
            progbar = keras.utils.Progbar(self.steps, stateful_metrics=["comm_bytes_per_step"])
            progbar.update(start)
        window: dict[str, float] = {}
        n_window, t0 = 0, time.perf_counter()
        result: dict[str, float] = {}
        step = start
        self._preemption = preemption.PreemptionGuard(self.strategy).install()  # issue 11
        while step < self.steps:
            logs = self.train_step(iterator)
            step += 1
            if self._guard_nonfinite(step, logs):  # skipped: not part of the averages
                logs = {}
            window = {k: window.get(k, 0.0) + v for k, v in logs.items()}
            n_window += 1 if logs else 0
            if progbar is not None:
                progbar.update(step, values=list(logs.items()))
            if (log_every and step % log_every == 0) or step == self.steps:
                dt = time.perf_counter() - t0
                self.last_logs = {k: v / max(n_window, 1) for k, v in window.items()}
                self.last_logs["examples_per_sec"] = n_window * self.global_batch / max(dt, 1e-9)
                if self.on_nonfinite == "skip":
                    self.last_logs["nonfinite_skipped"] = self.nonfinite_skipped
                self._log("train", step, self.last_logs)
                window, n_window, t0 = {}, 0, time.perf_counter()
            if eval_dataset_fn is not None and eval_every and step % eval_every == 0:
                result = self.evaluate(eval_dataset_fn, step=step)
            if (ckpt_every and step % ckpt_every == 0) or step == self.steps:
                self.save()
            elif step < self.steps and self._preemption.should_stop():
                stopped = self._preemption.stop(step, self.save, self.checkpoint_directory)
                self.train_loop_end()  # a barrier: nobody exits before the chief's save is done
                raise stopped
        self._preemption.uninstall()
        if eval_dataset_fn is not None and (not result or self.steps % max(eval_every, 1)):
            result = self.evaluate(eval_dataset_fn, step=step)
        self.train_loop_end()
        return result

    def evaluate(self, eval_dataset_fn: DatasetFn, step: int | None = None) -> dict[str, float]:
        """Mean loss and metrics over the eval split (or ``training.eval_batches`` batches)."""
        limit = self.config["training"]["eval_batches"]

        def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = eval_dataset_fn(ctx)
            self._check_features(ds.element_spec)
            return ds.take(int(limit)) if limit is not None else ds

        self.strategy.sync_non_trainable(self.model.non_trainable_variables)
        state = self.eval_begin()
        for batch in self.strategy.distribute_dataset(fn):
            state = self.eval_step(batch, state)
        metrics = self.eval_end(state)
        self._open_logs()
        self._log("eval", int(self.global_step.numpy()) if step is None else step, metrics)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_directory(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None

    def save(self) -> str | None:
        """Save on the chief (and, under MultiWorkerMirrored, scratch saves on the others)."""
        if self.checkpoint_directory is None:
            return None
        # Model and optimizer state (Adam's moments overflow first); identical on every rank.
        bad = nonfinite.all_finite(list(self.model.variables) + list(self.optimizer.variables))
        if bad is not None:  # never let a NaN checkpoint push good ones out of the kept set
            latest = tf.train.latest_checkpoint(str(self.checkpoint_directory))
            raise nonfinite.NonFiniteError(
                nonfinite.describe(
                    int(self.global_step.numpy()),
                    float(self.last_logs.get("loss", float("nan"))),
                    bad,
                    Path(latest).name if latest else None,
                    after_update=True,
                )
            )
        # Every process calls save() at the same step, so this collective lines up.
        self.strategy.sync_non_trainable(self.model.non_trainable_variables)
        target = self.strategy.checkpoint_dir(str(self.checkpoint_directory))
        if target is None:
            return None
        if self._manager is None or self._manager.directory != target:
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, target, max_to_keep=int(self.config["checkpoint"]["keep"])
            )
        # CheckpointManager writes the shards under temporary names, renames them, and only then
        # rewrites the 'checkpoint' index (itself written to a temp file and renamed), so a crash
        # mid-save leaves the index pointing at the previous, complete checkpoint.
        path = rundir.save_checkpoint(self._manager, int(self.global_step.numpy()))
        self.strategy.cleanup_checkpoint_dir(target)
        return path if self.strategy.is_chief else None

    def restore(self) -> int:
        """Restore the newest readable checkpoint (older ones if the newest is damaged); return its step."""
        directory = self.checkpoint_directory
        if directory is not None and self.config["checkpoint"]["resume"]:
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
        self.strategy.broadcast_variables(
            list(self.model.variables) + list(self.optimizer.variables) + [self.global_step]
        )
        return int(self.global_step.numpy())

    # -- logs --------------------------------------------------------------------------------
    def _open_logs(self) -> None:
        if not self.strategy.is_chief or self.run_dir is None or self._metrics_file is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run logs the steps after its checkpoint again: keep each step once.
        rundir.truncate_metrics(self.run_dir / "metrics.jsonl", int(self.global_step.numpy()))
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.config["logging"]["tensorboard"]:
            self._writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))

    def _log(self, split: str, step: int, values: Mapping[str, float]) -> None:
        if not self.strategy.is_chief or self._metrics_file is None:
            return
        record = {"split": split, "step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in values.items()})
        self._metrics_file.write(rundir.metrics_line(record) + "\n")
        self._metrics_file.flush()
        if self._writer is not None:
            with self._writer.as_default():
                for k, v in values.items():
                    # tf.summary.scalar needs the tensorboard package; the scalar plugin's
                    # metadata written by hand gives TensorBoard the same event without it.
                    tf.summary.write(
                        f"{split}/{k}", tf.constant(float(v)), step=step, metadata=_SCALAR_METADATA
                    )

    def close(self) -> None:
        if getattr(self, "_preemption", None) is not None:
            self._preemption.uninstall()
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def variable_checksums(variables: list[Any]) -> dict[str, float]:
    """A cheap fingerprint per variable (sum and sum of squares), for cross-replica comparisons."""
    out = {}
    for v in variables:
        a = np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float64)
        out[getattr(v, "path", getattr(v, "name", str(id(v))))] = float(a.sum() + (a * a).sum())
    return out
