"""The optimizer of ``optimizer.*`` and the process-wide settings a run depends on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # disable_op_determinism

if TYPE_CHECKING:
    from dist_share.config.schema import OptimizerConfig, TrainingConfig


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
    else:
        # An earlier run in this process (a notebook, a worker running several) may have turned
        # it on; it also forbids reading the clock inside a step (`signals.StepTimes`).
        tf_config.disable_op_determinism()
    keras.utils.set_random_seed(training.seed)
    keras.mixed_precision.set_global_policy(training.precision)
