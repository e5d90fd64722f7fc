"""What a distributed job shows besides its loss: the gradient norm and each rank's step time."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from dist_share.distribute.strategies import Strategy


def global_norm(grads: Sequence[Any]) -> tf.Tensor:
    """The L2 norm of all gradients together, as float32.

    A sparse gradient may list a row more than once (one entry per lookup, or per replica after
    an all-gather); its rows are summed first, so that the norm is that of the dense gradient.
    """
    squares = []
    for g in grads:
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):
            rows, index = tf.unique(g.indices)
            g = tf.math.unsorted_segment_sum(g.values, index, tf.shape(rows)[0])
        squares.append(tf.reduce_sum(tf.square(tf.cast(g, tf.float32))))
    return tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0)


class StepTimes:
    """Each step's time, and each rank's own share of it, over a logging interval.

    A synchronous step ends at the same moment on every rank, so the ranks' wall times are
    equal and cannot tell which rank held the others up. A rank's *own* time is its wall time
    minus the time it waited inside the gradient all-reduce for the others: the slow rank waits
    least. ``rank_step_time/<r>`` is rank r's median own time per step over the interval.

    Args:
        strategy: the run's strategy, whose processes are the ranks.
        global_batch: examples per step over all replicas (for ``examples_per_sec``).
        per_rank: log each rank's own time: the loop measures its waits in the collective
            (not under ``training.deterministic``: op determinism forbids reading the clock
            inside a step, nor in Keras fit, which has no hook around its all-reduce).
        slow_rank_margin: `slowest_rank` names a rank whose median own time is more than this
            fraction above the other ranks' median (``logging.slow_rank_margin``).
    """

    def __init__(
        self,
        strategy: Strategy,
        global_batch: int,
        per_rank: bool = True,
        slow_rank_margin: float = 0.25,
    ) -> None:
        self.strategy = strategy
        self.global_batch = global_batch
        self.per_rank = per_rank
        self.slow_rank_margin = slow_rank_margin
        self.reset()

    def reset(self) -> None:
        """Forget the interval and every rank's history (a re-formed elastic job numbers its
        ranks anew); the settings stay."""
        self._wall = 0.0
        self._steps = 0
        self._own: list[float] = []
        self.history: dict[int, list[float]] = {}  # rank -> its interval medians

    def add(self, wall: float, waited: float, steps: int) -> None:
        """One compiled call: its wall time, this process's wait in the collective, its steps."""
        self._wall += wall
        self._steps += steps
        self._own.append(max(wall - waited, 0.0) / steps)

    def interval(self) -> dict[str, float]:
        """The interval's logs (a collective under several processes: every process calls it),
        and a fresh interval. ``step_time`` counts training steps only, not evaluations or
        checkpoints between them."""
        step_time = self._wall / max(self._steps, 1)
        logs = {
            "step_time": step_time,
            "examples_per_sec": self.global_batch / max(step_time, 1e-9),
        }
        if self.per_rank and self.strategy.world_size > 1:
            own = statistics.median(self._own) if self._own else 0.0
            ranks = self.strategy.process_values(own)
            for rank, value in enumerate(ranks):
                logs[f"rank_step_time/{rank}"] = value
                self.history.setdefault(rank, []).append(value)
            logs["rank_step_time_spread"] = max(ranks) - min(ranks)
        self._wall, self._steps, self._own = 0.0, 0, []
        return logs

    def slowest_rank(self) -> str | None:
        """One line naming the slowest rank of the run if its median own time is more than
        ``slow_rank_margin`` above the other ranks' median; None otherwise (or with one
        process). The others' median, not all ranks': with two ranks that would include the
        slow one itself."""
        if len(self.history) < 2:
            return None
        per_rank = {rank: statistics.median(values) for rank, values in self.history.items()}
        rank, slowest = max(per_rank.items(), key=lambda item: item[1])
        others = statistics.median([v for r, v in per_rank.items() if r != rank])
        if others <= 0 or slowest <= others * (1 + self.slow_rank_margin):
            return None
        return (
            f"slowest rank: {rank} took {slowest * 1e3:.1f} ms per step of its own work, "
            f"{(slowest / others - 1) * 100:.0f}% more than the other ranks' median "
            f"({others * 1e3:.1f} ms; train/rank_step_time in TensorBoard)"
        )


def learning_rate(optimizer: Any) -> float:
    """The optimizer's current learning rate (a schedule's value at its step; a variable of a
    tf.distribute scope read from the host)."""
    return float(tf.convert_to_tensor(optimizer.learning_rate))
