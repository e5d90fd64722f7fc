"""The Siamese family: two streams through one tower, a distance head, contrastive loss."""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_share.config.schema import DataConfig, ModelConfig
from dist_share.data.checks import check_binary_labels
from dist_share.data.digits import digits_for, other_class, same_class
from dist_share.data.types import Arrays
from dist_share.errors import ConfigError
from dist_share.families.base import TowerFamily


class SiameseFamily(TowerFamily):
    name = "siamese"
    losses = ("contrastive",)
    heads = ("l2", "cosine")
    fixed_streams = ("left", "right")

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        if data.labels == "classes":
            return self.labelled_examples(data, split, n, salt=1)
        images, by_class, rng = digits_for(data, split, salt=1)
        same = rng.permutation(np.arange(n) < n // 2)  # balanced: exactly half the pairs match
        ca = rng.integers(0, 10, n)
        cb = np.where(same, ca, other_class(rng, ca))
        left = same_class(rng, by_class, ca)
        right = same_class(rng, by_class, cb)
        return {"left": images[left], "right": images[right]}, same.astype(np.float32)

    def check_labels(self, labels: np.ndarray, where: str, data: DataConfig) -> None:
        if data.labels == "classes":
            super().check_labels(labels, where, data)
        else:
            check_binary_labels(labels, where, self.name)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        from dist_share.model.heads import CosineSimilarity, DecisionThreshold, L2Distance
        from dist_share.model.metrics import PairAccuracy

        if self.labels_for(model) == "classes":
            return self.build_item_output(model, inputs)
        outs = self.build_tower_outputs(model, inputs)
        layer = (
            L2Distance(name="distance")
            if model.head == "l2"
            else CosineSimilarity(as_distance=True, name="distance")
        )
        threshold = getattr(loss, "margin", 1.0) / 2
        distance = layer(outs)
        if model.head_threshold == "calibrated":
            decision = DecisionThreshold(threshold, name="decision_threshold")
            return decision(distance), {"pair_accuracy": PairAccuracy(decision.threshold)}
        return distance, {"pair_accuracy": PairAccuracy(threshold=threshold)}

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        model = super().check_model(model, num_views)
        if model.head_threshold == "calibrated" and not self.calibrates(model):
            raise ConfigError(
                "model.head_threshold",
                "calibrated thresholds a pair distance; with model.loss.mining the model "
                "embeds single items and has none (use half_margin)",
            )
        return model

    def calibrates(self, model: ModelConfig) -> bool:
        return self.labels_for(model) == "given"
