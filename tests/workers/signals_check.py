"""Two short runs of the shipped Siamese config that log to TensorBoard: ranks even, then rank 1
slowed on purpose (a sleep in its train step); the run directories and the chief's console.

Run inside train_worker.py's launch (check ``signals``); tests/integration/test_tensorboard.py
reads the event files and the end-of-run lines.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

from dist_share.distribute.gradients import GradientOptions
from dist_share.run.resolve import replace
from dist_share.train.loops.custom import CustomLoop
from dist_share.train.trainer import Trainer
from tests.workers import train_common as tc

MODEL = "siamese_cfg"
STEPS, LOG_EVERY, BATCH = 16, 4, 16
# Rank 1's extra time per step in the slowed run: several times a step of this model here.
SLOW_RANK, DELAY = 1, 0.04
# Even ranks differ by up to a quarter here when two launches share the 2 cores; the slowed rank
# takes ten times the other's time. A margin between the two tells them apart whatever the load.
MARGIN = 1.0


def _train(strategy: Any, run_dir: str, delay: float) -> str:
    """Train; the chief's console output (the end-of-run line goes there)."""

    class Loop(CustomLoop):
        def train_step(self, iterator: Any, num_steps: int = 1) -> dict[str, float]:
            if delay and self.strategy.rank == SLOW_RANK:
                time.sleep(delay * num_steps)
            return super().train_step(iterator, num_steps)

    config = replace(
        tc.config_of(MODEL),
        f"strategy.name={strategy.name}",
        f"training.steps={STEPS}",
        f"training.log_every={LOG_EVERY}",
        f"training.batch_size={BATCH}",
        "training.eval_every=0",
        "logging.progress_bar=false",
        "logging.tensorboard=true",
        f"logging.slow_rank_margin={MARGIN}",
    )
    strategy.gradient_options = GradientOptions.from_config(config.strategy)
    trainer = Trainer(tc.BUILDERS[MODEL], strategy, config, run_dir, loop=Loop)
    console = io.StringIO()
    trainer.logger.stream = console
    trainer.train(tc.make_dataset_fn(MODEL, BATCH))
    trainer.close()
    return console.getvalue()


def check(strategy: Any, root: str) -> dict:
    """{'even' | 'slowed': {'run_dir', 'console'}} on every rank (the console is the chief's)."""
    out = {}
    for name, delay in (("even", 0.0), ("slowed", DELAY)):
        run_dir = os.path.join(root, name)
        out[name] = {"run_dir": run_dir, "console": _train(strategy, run_dir, delay)}
    return out
