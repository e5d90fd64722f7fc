"""The multi-view family: N corrupted views of one digit through one tower, combined, classified."""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_share.config.schema import DataConfig, ModelConfig
from dist_share.data.checks import check_class_labels
from dist_share.data.digits import corrupt, digits_with_labels
from dist_share.data.types import Arrays
from dist_share.families.base import TowerFamily


class MultiviewFamily(TowerFamily):
    name = "multiview"
    losses = ("sparse_categorical_crossentropy",)
    heads = ("concat", "mean", "sum")
    label_dtype = "int32"

    def streams(self, data: DataConfig) -> list[str]:
        return [f"view{i}" for i in range(data.num_views)]

    def random_labels(self, rng: np.random.Generator, n: int, data: DataConfig) -> np.ndarray:
        return rng.integers(0, 10, n).astype(np.int32)

    def check_labels(self, labels: np.ndarray, where: str, data: DataConfig) -> None:
        check_class_labels(labels, where, self.name)

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:

        images, labels, rng = digits_with_labels(data, split, salt=3)
        idx = rng.integers(0, len(labels), n)
        v = data.views
        feats = {
            f"view{i}": corrupt(rng, images[idx], v.max_shift, v.noise_std, v.occlusion)
            for i in range(data.num_views)
        }
        return feats, labels[idx]

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:

        import keras

        from dist_share.model.heads import Combine
        from dist_share.model.metrics import ClassAccuracy

        outs = self.build_tower_outputs(model, inputs)
        combined = Combine(model.head, name="combine")(outs)
        logits = keras.layers.Dense(model.num_classes, dtype="float32", name="logits")(combined)
        return logits, {"accuracy": ClassAccuracy()}
