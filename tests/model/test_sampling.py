"""The in-batch softmax's corrections equal their formulas, and the streaming frequency estimate
follows Yi et al.'s update, counting each step once however it is split into micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dist_share.model.losses import InBatchSoftmaxLoss
from dist_share.model.sampling import CandidateFrequency, same_step

RNG = np.random.default_rng(0)
PAIRS = RNG.normal(size=(6, 2, 3)).astype(np.float32)
IDS = np.array([4, 1, 4, 2, 1, 4], np.int32)  # item 4 is three rows' positive, item 1 two rows'


def reference(pairs, ids, temperature, log_q=None, remove_hits=False) -> np.ndarray:
    """Softmax cross-entropy of row i against every row's candidate, from the definitions."""
    logits = pairs[:, 0] @ pairs[:, 1].T / temperature
    if log_q is not None:
        logits = logits - log_q[ids][None, :]
    if remove_hits:
        duplicate = (ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)
        logits = np.where(duplicate, -np.inf, logits)
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return -np.diag(log_softmax)


def frequency(intervals: np.ndarray) -> CandidateFrequency:
    layer = CandidateFrequency(len(intervals), name="frequency")
    layer.build()
    layer.interval.assign(intervals.astype(np.float32))
    return layer


def test_accidental_hits_are_masked_but_the_positive_is_kept() -> None:
    loss = InBatchSoftmaxLoss(temperature=0.5, remove_accidental_hits=True)
    values = loss(IDS, PAIRS).numpy()
    np.testing.assert_allclose(values, reference(PAIRS, IDS, 0.5, remove_hits=True), atol=1e-5)
    plain = InBatchSoftmaxLoss(temperature=0.5)(IDS, PAIRS).numpy()
    unique = np.array([IDS.tolist().count(i) == 1 for i in IDS])
    assert unique.any() and (~unique).any()
    # Masking removes negatives only: a row whose item recurs loses less; a row whose item
    # does not recur has nothing masked and keeps its loss.
    assert (values[~unique] < plain[~unique] - 1e-4).all()
    np.testing.assert_allclose(values[unique], plain[unique], atol=1e-6)


def test_logq_correction_subtracts_each_candidates_log_probability() -> None:
    intervals = np.array([1.0, 2.0, 8.0, 0.0, 4.0, 1.0])  # id 3 never seen: log q = 0
    loss = InBatchSoftmaxLoss(temperature=0.5, logq_correction=True)
    loss.frequency = frequency(intervals)
    log_q = -np.log(np.maximum(intervals, 1.0))
    values = loss(IDS, PAIRS).numpy()
    np.testing.assert_allclose(values, reference(PAIRS, IDS, 0.5, log_q=log_q), atol=1e-5)
    both = InBatchSoftmaxLoss(temperature=0.5, logq_correction=True, remove_accidental_hits=True)
    both.frequency = loss.frequency
    np.testing.assert_allclose(
        both(IDS, PAIRS).numpy(),
        reference(PAIRS, IDS, 0.5, log_q=log_q, remove_hits=True),
        atol=1e-5,
    )


def test_logq_correction_without_its_estimate_says_so() -> None:
    with pytest.raises(ValueError, match="CandidateFrequency"):
        InBatchSoftmaxLoss(logq_correction=True)(IDS, PAIRS)


def reference_estimate(batches, vocab: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Yi et al. 2019, algorithm 1, one step per batch (t = 1, 2, ...)."""
    last, interval = np.zeros(vocab, np.int64), np.zeros(vocab)
    for t, batch in enumerate(batches, start=1):
        for y in np.unique(batch):
            elapsed = t - last[y]
            interval[y] = elapsed if last[y] == 0 else (1 - alpha) * interval[y] + alpha * elapsed
            last[y] = t
    return last, interval


def test_frequency_estimate_follows_the_streaming_update() -> None:
    batches = [RNG.integers(0, 10, 8) for _ in range(30)]
    layer = CandidateFrequency(10, alpha=0.1)
    layer.build()
    for batch in batches:
        layer(tf.constant(batch), training=True)
    last, interval = reference_estimate(batches, 10, 0.1)
    np.testing.assert_array_equal(layer.last_seen.numpy(), last)
    np.testing.assert_allclose(layer.interval.numpy(), interval, rtol=1e-6)
    assert int(layer.step.numpy()) == 30
    # Frequent items have short intervals: log q near 0; rare ones more negative.
    log_q = layer.log_probability(tf.range(10)).numpy()
    assert (log_q <= 0).all()


def test_inference_leaves_the_estimate_alone() -> None:
    layer = CandidateFrequency(5)
    layer.build()
    out = layer(tf.constant([1, 2, 2]), training=False)
    np.testing.assert_array_equal(out.numpy(), [1, 2, 2])
    assert int(layer.step.numpy()) == 0 and not layer.last_seen.numpy().any()


def test_micro_batches_and_replays_of_a_step_count_it_once() -> None:
    batches = [RNG.integers(0, 10, 8) for _ in range(12)]
    whole = CandidateFrequency(10, alpha=0.1)
    split = CandidateFrequency(10, alpha=0.1)
    for layer in (whole, split):
        layer.build()
    for batch in batches:
        whole(tf.constant(batch), training=True)
        split(tf.constant(batch[:4]), training=True)  # the step's first micro-batch
        with same_step():
            split(tf.constant(batch[4:]), training=True)  # the next one
            split(tf.constant(batch[:4]), training=True)  # GradCache's second forwards
            split(tf.constant(batch[4:]), training=True)
    for name in ("step", "last_seen", "interval"):
        np.testing.assert_array_equal(
            getattr(split, name).numpy(), getattr(whole, name).numpy(), err_msg=name
        )


def test_the_estimate_layer_round_trips_through_its_config() -> None:
    layer = CandidateFrequency(7, alpha=0.05, name="candidate_frequency")
    again = CandidateFrequency.from_config(layer.get_config())
    assert (again.vocab_size, again.alpha, again.name) == (7, 0.05, "candidate_frequency")
