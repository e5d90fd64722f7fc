"""Class-balanced batches: P classes x K rows of each in every global batch.

Batch-hard and semi-hard mining need every anchor to have positives in the batch; a shuffled
batch of 10 classes rarely gives them to all. Like TF Similarity's MultiShotMemorySampler,
each global batch draws ``classes_per_batch`` classes and ``examples_per_class`` rows of each
(with replacement only when a class has fewer rows). Batch b is drawn from ``(seed, b)`` alone,
so every process draws the same batches and a resumed run continues where it stopped.
"""

from __future__ import annotations

import numpy as np

from dist_share.errors import ConfigError


class ClassBalancedBatches:
    """The row indices of global batch ``b`` (grouped by class) for ``labels``."""

    def __init__(
        self, labels: np.ndarray, classes_per_batch: int, examples_per_class: int, seed: int
    ) -> None:
        self.classes = np.unique(labels)
        if classes_per_batch > len(self.classes):
            raise ConfigError(
                "data.sampler.classes_per_batch",
                f"asks for {classes_per_batch} classes per batch but the train split has "
                f"{len(self.classes)}",
            )
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.classes_per_batch = int(classes_per_batch)
        self.examples_per_class = int(examples_per_class)
        self.seed = int(seed)

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.examples_per_class

    def __call__(self, b: int | np.integer) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 11, int(b)])
        chosen = rng.choice(len(self.classes), self.classes_per_batch, replace=False)
        k = self.examples_per_class
        rows = [rng.choice(self.members[c], k, replace=len(self.members[c]) < k) for c in chosen]
        return np.concatenate(rows).astype(np.int64)
