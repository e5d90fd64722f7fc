"""Class-balanced batches: P classes x K rows in every global batch, the same in every process
and after a resume, and the union of the replicas' shares is the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_share.data.balanced import ClassBalancedBatches
from dist_share.data.pipeline import arrays_dataset_fn
from dist_share.errors import ConfigError

LABELS = np.repeat(np.arange(6), [5, 5, 5, 5, 5, 1])  # class 5 has one row only


def test_every_batch_holds_p_classes_of_k_rows() -> None:
    draw = ClassBalancedBatches(LABELS, 3, 4, seed=7)
    for b in range(50):
        rows = draw(b)
        assert len(rows) == 12
        classes, counts = np.unique(LABELS[rows], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()
        for c in classes:  # without replacement where the class has K rows
            picked = rows[LABELS[rows] == c]
            assert c == 5 or len(set(picked)) == 4
    np.testing.assert_array_equal(draw(3), ClassBalancedBatches(LABELS, 3, 4, seed=7)(3))
    assert not np.array_equal(draw(3), ClassBalancedBatches(LABELS, 3, 4, seed=8)(3))


def test_more_classes_per_batch_than_the_data_has_names_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        ClassBalancedBatches(LABELS, 7, 2, seed=0)
    assert e.value.path == "data.sampler.classes_per_batch"
    assert "7 classes per batch but the train split has 6" in str(e.value)


def _batches(fn, ctx, count: int) -> list[np.ndarray]:
    it = iter(fn(ctx))
    return [next(it)[1].numpy() for _ in range(count)]


def test_replicas_shares_make_the_balanced_global_batch() -> None:
    feats = {"item": np.arange(len(LABELS), dtype=np.float32)[:, None]}
    draw = ClassBalancedBatches(LABELS, 2, 3, seed=1)
    fn = arrays_dataset_fn(feats, LABELS, "train", 6, 1, 100, draw)
    whole = _batches(fn, tf.distribute.InputContext(), 4)
    shares = [
        _batches(fn, tf.distribute.InputContext(2, i, 2), 4) for i in range(2)
    ]  # two input pipelines, one replica each
    for b in range(4):
        np.testing.assert_array_equal(whole[b], LABELS[draw(b)])
        union = np.concatenate([shares[0][b], shares[1][b]])
        np.testing.assert_array_equal(np.sort(union), np.sort(whole[b]))
