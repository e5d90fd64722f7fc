"""XLA and a batch-coupled model over several replicas: ``jit_compile: true`` is a one-line
ConfigError naming the key, ``auto`` (taken as on, as on a GPU) trains uncompiled and says so.

Run inside train_worker.py's launch (check ``xla_coupled``); tests/train/test_precision.py
reads the result.
"""

from __future__ import annotations

import io
from typing import Any

from dist_share.distribute.gradients import GradientOptions
from dist_share.errors import ConfigError
from dist_share.run.resolve import replace
from dist_share.train import compilation
from dist_share.train.trainer import Trainer
from tests.workers import train_common as tc

MODEL = "two_tower_ibs"  # in-batch softmax over the global batch: gathers every replica's rows
BATCH = 8


def _config(strategy: Any, jit: str) -> Any:
    return replace(
        tc.config_of(MODEL),
        f"strategy.name={strategy.name}",
        "training.steps=2",
        f"training.batch_size={BATCH}",
        "training.eval_every=0",
        f"training.jit_compile={jit}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    )


def check(strategy: Any) -> dict:
    """{'forced': the ConfigError's (path, message) or None, 'auto': {'compiled', 'console',
    'loss'}}."""
    out: dict[str, Any] = {}
    config = _config(strategy, "true")
    strategy.gradient_options = GradientOptions.from_config(config.strategy)
    trainer = Trainer(tc.BUILDERS[MODEL], strategy, config, None)
    try:
        trainer.train(tc.make_dataset_fn(MODEL, BATCH))
        out["forced"] = None
    except ConfigError as e:
        out["forced"] = [e.path, str(e)]
    trainer.close()

    # auto on a GPU machine; here, on CPUs, auto is off, so the GPU case is taken directly.
    config = _config(strategy, "auto")
    trainer = Trainer(tc.BUILDERS[MODEL], strategy, config, None)
    trainer.loop.replica_pass = compilation.ReplicaPass(
        trainer.loop._replica_gradients, compilation.TRY, trainer.logger.note
    )
    console = io.StringIO()
    trainer.logger.stream = console
    trainer.train(tc.make_dataset_fn(MODEL, BATCH))
    out["auto"] = {
        "compiled": trainer.loop.replica_pass.compiled,
        "console": console.getvalue(),
        "loss": trainer.last_logs["loss"],
    }
    trainer.close()
    return out
