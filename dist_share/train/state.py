"""`TrainState`: the model, its optimizer and the step counter, and their checkpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from dist_share.distribute.strategies import Strategy
from dist_share.errors import JobError
from dist_share.train.checkpoints import save_checkpoint
from dist_share.train.guards import nonfinite
from dist_share.train.optimizer import make_optimizer

if TYPE_CHECKING:
    from dist_share.config.schema import Config
    from dist_share.families.build import ModelSpec

log = logging.getLogger(__name__)


class TrainState:
    """The model, its optimizer and the step counter, created in the strategy's scope, and
    their checkpoints: everything a resumed run needs.

    The model's variables are listed explicitly in the checkpoint: tf.train.Checkpoint(model=...)
    does not see Keras 3 layers that hold sublayers in Python lists (SharedTower's weight sets,
    or any user layer built that way), so it would save neither their weights nor their
    batch-norm statistics. The list is in model.variables order, which depends only on the
    architecture, not on layer names.

    Args:
        build_spec: called in ``strategy.scope()``; returns a `ModelSpec`-like object
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
            if config.training.loss_scaled:
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
        path = save_checkpoint(self._manager, self.step)
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
