"""Preemption: SIGTERM makes every rank stop at the same step, the chief save, the job exit 75.

The handler only sets a flag; at step boundaries the ranks agree on it (summed over every
process), so all of them stop after the same step. Details: docs/RELIABILITY.md, "Preemption".
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from dist_share.errors import EXIT_PREEMPTED, JobError


class Preempted(JobError):
    """Every rank stopped at ``step`` on SIGTERM and the checkpoint of that step was written."""

    exit_code = EXIT_PREEMPTED


class PreemptionGuard:
    """Catch SIGTERM while training and decide, together with the other ranks, when to stop.

    Args:
        strategy: the training `Strategy` (its kind decides how the flag is summed).
        signals: the signals that mean "save and stop" (default SIGTERM).

    Use as a context manager around the loop (or `install` / `uninstall`); read `requested`
    at the same steps on every rank and sum it over the ranks (the custom loop in its compiled
    step's reduction of the logs, Keras fit with `agree`), and call `stop` on every rank once
    the sum is positive.
    """

    def __init__(self, strategy: Any, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.strategy = strategy
        self.signals = signals
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            print(
                f"dist-share: rank {self.strategy.rank} got {signal.Signals(signum).name}; "
                "stopping at the next step boundary to save a checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def install(self) -> PreemptionGuard:
        """Start catching the signals (main thread only; elsewhere this is a no-op)."""
        if not self._previous and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This process got the signal (the others may not have yet)."""
        return self.received is not None

    def stop(self, step: int, save: Any, directory: Any) -> Preempted:
        """Save (every rank calls this: a save can be a collective) and return the error to raise."""
        t0 = time.monotonic()
        save()
        took = time.monotonic() - t0
        since = time.monotonic() - self.received_at if self.received_at is not None else None
        waited = f", {since:.1f} s after the signal" if since is not None else ""
        return Preempted(
            f"preempted: every rank stopped after step {step} and the checkpoint of step {step} "
            f"was written to {directory} in {took:.1f} s{waited}. Rerun the same command to "
            f"resume (exit code {EXIT_PREEMPTED})."
        )


def agree(strategy: Any, flags: Mapping[str, bool]) -> dict[str, bool]:
    """Each flag: whether it is true on any process of ``strategy``. Every process must call
    this with the same keys (it is one collective when there are several processes).

    Horovod: one allreduce of a vector. MultiWorkerMirrored: one compiled cross-worker sum.
    One process (local, mirrored): the flags themselves.
    """
    keys = sorted(flags)
    if getattr(strategy, "world_size", 1) <= 1:
        return {k: bool(flags[k]) for k in keys}
    if strategy.gradient_backend == "horovod":
        summed = strategy.allreduce_host_sum({k: float(flags[k]) for k in keys})
        return {k: summed[k] > 0 for k in keys}
    import tensorflow as tf

    vector = tf.constant([float(flags[k]) for k in keys], tf.float32)
    summed = _sum_over_workers(strategy.tf_strategy)(vector).numpy()
    return {k: bool(v > 0) for k, v in zip(keys, summed, strict=True)}


_SUM_FNS: dict[int, Any] = {}


def _sum_over_workers(tf_strategy: Any) -> Any:
    """A compiled cross-worker sum (eager collectives are slow and warn on every call)."""
    fn = _SUM_FNS.get(id(tf_strategy))
    if fn is None:
        import tensorflow as tf

        @tf.function
        def fn(value: Any) -> Any:
            per_replica = tf_strategy.run(tf.identity, args=(value,))
            return tf_strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _SUM_FNS[id(tf_strategy)] = fn
    return fn
