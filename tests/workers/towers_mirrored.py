"""Build and fit every model family inside a 2-device MirroredStrategy scope.

Run by train_worker.py inside the shared mirrored launch (tests/helpers/train_jobs.py), whose
strategy has the two logical CPU devices (configured before TensorFlow initialised its devices);
tests/families/test_models.py reads the result.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dist_share.config.schema import FAMILIES
from dist_share.families.build import build_model
from dist_share.run.resolve import parse_model


def _snapshot(weights) -> list:
    return [w.numpy().copy() for w in weights]


def _moved(before, weights) -> bool:
    return any(not np.array_equal(b, w.numpy()) for b, w in zip(before, weights, strict=True))


def check(strategy: tf.distribute.Strategy) -> dict:
    from tests.families.test_models import CASES, _batch

    result: dict = {"num_replicas": strategy.num_replicas_in_sync}
    for family in FAMILIES:
        cfg, specs = CASES[family]
        keras.utils.set_random_seed(0)
        with strategy.scope():
            spec = build_model(parse_model(cfg), specs)
            spec.model.compile(optimizer=keras.optimizers.SGD(0.05), loss=spec.loss)
        x, y = _batch(family, specs)
        before = _snapshot(spec.model.trainable_weights)
        history = spec.model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        result[family] = {
            "losses": [float(v) for v in history.history["loss"]],
            "moved": _moved(before, spec.model.trainable_weights),
        }
        if family == "triplet":
            tower = spec.model.get_layer("tower")
            shared, streams = (
                tower.blocks[0].trainable_weights,
                [w for b in tower.blocks[1:] for w in b.trainable_weights],
            )
            switch = {}
            for label, flag in (("first", True), ("second", False)):
                tower.use_shared.assign(flag)
                s0, p0 = _snapshot(shared), _snapshot(streams)
                spec.model.fit(x, y, batch_size=16, epochs=1, verbose=0)
                switch[f"shared_moved_{label}"] = _moved(s0, shared)
                switch[f"streams_moved_{label}"] = _moved(p0, streams)
            result["switch"] = switch
    return result
