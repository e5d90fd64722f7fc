"""Reload tower exports in a fresh process and compare them with the full model's embeddings.

usage: tower_export_check.py OUT_JSON RUN_DIR:TOWER ...

For each run and tower: the exported SavedModel's serving signature (its input names) and the
largest difference, over a batch of the run's eval data, between each exported format and the
full model's embedding of that tower, restored from the run's checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import dist_share.model.heads  # noqa: F401  (registers the layers, as the export's README says)
import dist_share.model.sampling  # noqa: F401
import dist_share.model.towers  # noqa: F401
from dist_share.run.export import tower_export_dir
from dist_share.run.restored import ONE_PROCESS, RestoredRun

results = {}
for target in sys.argv[2:]:
    run_dir, name = target.rsplit(":", 1)
    restored = RestoredRun(Path(run_dir), "check", ONE_PROCESS)
    tower = restored.tower(name)
    features, _ = next(iter(restored.run.inputs.eval_fn(None)))
    expected = np.asarray(tower.reference(features))
    own = {s: features[s] for s in tower.streams}
    path = tower_export_dir(Path(run_dir), name)
    loaded = tf.saved_model.load(str(path / "saved_model"))
    signature = loaded.signatures["serving_default"]
    served = np.asarray(loaded.serve(own))
    reloaded = np.asarray(keras.models.load_model(str(path / "model.keras"))(own, training=False))
    results[target] = {
        "signature_inputs": sorted(signature.structured_input_signature[1]),
        "saved_model": float(np.max(np.abs(served - expected))),
        "keras": float(np.max(np.abs(reloaded - expected))),
        "rows": len(expected),
        "tower_json": json.loads((path / "tower.json").read_text()),
    }
    restored.close()
Path(sys.argv[1]).write_text(json.dumps(results))
