"""The signals of a distributed job: the gradient norm, each rank's own step time and the
slowest-rank line, on one process and under horovodrun x2 (events read back with TensorBoard's
reader)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dist_share.distribute.strategies import Strategy
from dist_share.train.signals import StepTimes, global_norm
from tests.helpers import train_jobs
from tests.helpers.runs import metrics
from tests.workers import signals_check


def test_the_gradient_norm_of_a_sparse_gradient_is_that_of_its_dense_sum() -> None:
    # Row 2 listed twice (two lookups): the dense gradient holds their sum, not both rows.
    sparse = tf.IndexedSlices(
        tf.constant([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]]), tf.constant([2, 0, 2]), [4, 2]
    )
    dense = tf.constant([[1.0, -1.0]])
    expected = np.sqrt(1.5**2 + 2.5**2 + 3**2 + 4**2 + 1 + 1)
    assert float(global_norm([sparse, None, dense])) == pytest.approx(expected, rel=1e-6)
    assert float(global_norm([])) == 0.0


class _Ranks(Strategy):
    """What `StepTimes` asks of a strategy: the ranks' values of one number, given here."""

    def __init__(self, *others: float) -> None:
        self.others = others

    @property
    def world_size(self) -> int:
        return 1 + len(self.others)

    def process_values(self, value: float) -> list[float]:
        return [value, *self.others]


def test_a_rank_is_named_only_when_slower_than_the_others_median_by_the_margin() -> None:
    even = StepTimes(_Ranks(0.012), global_batch=64)  # the default margin: a quarter
    even.add(wall=0.05, waited=0.04, steps=1)  # own time 10 ms
    logs = even.interval()
    assert logs["rank_step_time/0"] == pytest.approx(0.010)
    assert logs["rank_step_time_spread"] == pytest.approx(0.002)
    assert even.slowest_rank() is None  # 20 % more

    # Two ranks: measured against the other rank, not a median that holds the slow one itself.
    two = StepTimes(_Ranks(0.013), global_batch=64)
    two.add(wall=0.05, waited=0.04, steps=1)
    two.interval()
    line = two.slowest_rank()
    assert line is not None and line.startswith("slowest rank: 1 took 13.0 ms")
    assert "30% more than the other ranks' median (10.0 ms" in line

    slow = StepTimes(_Ranks(0.011, 0.020, 0.009), global_batch=64)
    slow.add(wall=0.04, waited=0.03, steps=1)
    slow.add(wall=0.05, waited=0.04, steps=1)
    slow.add(wall=0.90, waited=0.0, steps=1)  # the median, not the mean: a hiccup is not counted
    slow.interval()
    line = slow.slowest_rank()
    assert line is not None and line.startswith("slowest rank: 2 took 20.0 ms")
    assert "100% more than the other ranks' median (10.0 ms" in line

    wide = StepTimes(_Ranks(0.019), global_batch=64, slow_rank_margin=1.0)
    wide.add(wall=0.05, waited=0.04, steps=1)
    wide.interval()
    assert wide.slowest_rank() is None  # 90 % more, under a margin of 100 %


def test_steps_of_one_call_share_its_time() -> None:
    times = StepTimes(_Ranks(), global_batch=64, per_rank=True)
    times.add(wall=0.3, waited=0.0, steps=3)
    times.add(wall=0.1, waited=0.0, steps=1)
    logs = times.interval()
    # One process: no per-rank entries.
    assert logs == {"step_time": pytest.approx(0.1), "examples_per_sec": pytest.approx(640)}
    assert times.interval()["step_time"] == 0.0  # a new interval


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    reader.Reload()
    return {
        tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in reader.Tensors(tag)}
        for tag in reader.Tags()["tensors"]
        if not tag.startswith("_hparams_")
    }


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_horovodrun_logs_each_ranks_step_time_and_names_a_slowed_rank() -> None:
    ranks = train_jobs.check("horovod_gloo", "signals")
    chief = ranks[0]
    steps = list(range(signals_check.LOG_EVERY, signals_check.STEPS + 1, signals_check.LOG_EVERY))
    for name in ("even", "slowed"):
        run = Path(chief[name]["run_dir"])
        events = _scalars(run)
        for tag in (
            "train/loss", "train/examples_per_sec", "train/step_time", "train/learning_rate",
            "train/grad_norm", "train/comm_bytes_per_step", "train/nonfinite_skipped",
            "train/rank_step_time/0", "train/rank_step_time/1", "train/rank_step_time_spread",
        ):  # fmt: skip
            assert sorted(events.get(tag, {})) == steps, (name, tag, sorted(events))
        assert not [t for t in events if t.startswith("train/rank_step_time/2")]  # one per rank
        for record in metrics(run, "train"):
            own = [record[f"rank_step_time/{r}"] for r in (0, 1)]
            assert record["rank_step_time_spread"] == pytest.approx(max(own) - min(own))
            assert min(own) > 0
    slowed = metrics(Path(chief["slowed"]["run_dir"]), "train")
    for record in slowed:  # rank 1 sleeps 40 ms a step: it, not rank 0, is the slow one
        assert record["rank_step_time/1"] - record["rank_step_time/0"] > 0.02, record
    # The line is the chief's, once, and only where a rank was held back.
    line = chief["slowed"]["console"].strip()
    assert line.startswith("slowest rank: 1 took") and "% more than the other ranks' median" in line
    # Even ranks differ by far less than the margin the check sets (signals_check.MARGIN).
    even = metrics(Path(chief["even"]["run_dir"]), "train")
    ratios = [record["rank_step_time/1"] / record["rank_step_time/0"] for record in even]
    assert 1 / (1 + signals_check.MARGIN) < statistics.median(ratios) < 1 + signals_check.MARGIN
    assert chief["even"]["console"] == ""
    assert ranks[1]["slowed"]["console"] == ranks[1]["even"]["console"] == ""
