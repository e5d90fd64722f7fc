"""The triplet family: anchor, positive and negative through one tower, triplet loss."""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_share.config.schema import DataConfig, ModelConfig
from dist_share.data.digits import digits_for, other_class, same_class
from dist_share.data.types import Arrays
from dist_share.families.base import TowerFamily


class TripletFamily(TowerFamily):
    name = "triplet"
    losses = ("triplet",)
    heads = ("l2",)
    fixed_streams = ("anchor", "positive", "negative")

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        if data.labels == "classes":
            return self.labelled_examples(data, split, n, salt=2)
        images, by_class, rng = digits_for(data, split, salt=2)
        ca = rng.integers(0, 10, n)
        anchor = same_class(rng, by_class, ca)
        positive = same_class(rng, by_class, ca)
        negative = same_class(rng, by_class, other_class(rng, ca))
        feats = {
            "anchor": images[anchor],
            "positive": images[positive],
            "negative": images[negative],
        }
        return feats, np.zeros(n, np.float32)

    def random_labels(self, rng: np.random.Generator, n: int, data: DataConfig) -> np.ndarray:
        if data.labels == "classes":
            return super().random_labels(rng, n, data)
        return np.zeros(n, np.float32)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        from dist_share.model.heads import TripletDistances
        from dist_share.model.metrics import TripletAccuracy

        if self.labels_for(model) == "classes":
            return self.build_item_output(model, inputs)
        outs = self.build_tower_outputs(model, inputs)
        return TripletDistances(name="distances")(outs), {"triplet_accuracy": TripletAccuracy()}
