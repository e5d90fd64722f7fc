"""Reload an exported run both ways and compare with the checkpointed model on eval data.

usage: cli_export_check.py RUN_DIR OUT_JSON
Independent of the CLI's own check: the reference model is rebuilt from config.yaml and restored
from the run's newest checkpoint by the trainer (the checkpoint format is the trainer's).
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.families import build as models
from dist_share.run import directory as rundir
from dist_share.run.inputs import input_specs, make_dataset_fn
from dist_share.train.trainer import Trainer

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = rundir.read_config(run_dir)
specs = input_specs(cfg.data)
trainer = Trainer(
    lambda: models.build_model(cfg.model, specs),
    get_strategy(StrategyConfig(name="local")),
    cfg,
    run_dir,
)
step = trainer.restore()
features, _ = next(iter(make_dataset_fn(cfg.data, "eval", 32, 0)(None)))
reference = np.asarray(trainer.model(features, training=False))
loaded = tf.saved_model.load(str(run_dir / "export" / "saved_model"))
served = np.asarray(loaded.serve(features))
reloaded = np.asarray(
    keras.models.load_model(str(run_dir / "export" / "model.keras"))(features, training=False)
)
untrained = np.asarray(
    models.build_model(cfg.model, input_specs(cfg.data)).model(features, training=False)
)
out.write_text(
    json.dumps(
        {
            "shape": list(reference.shape),
            "step": step,
            "saved_model_diff": float(np.max(np.abs(served - reference))),
            "keras_diff": float(np.max(np.abs(reloaded - reference))),
            "untrained_diff": float(np.max(np.abs(untrained - reference))),
        }
    )
)
