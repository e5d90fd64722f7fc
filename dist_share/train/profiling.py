"""`ProfileWindow`: a TF profiler trace (and Horovod's timeline) of the steps ``training.profile`` asks for."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import tensorflow as tf

from dist_share.config.schema import ProfileConfig
from dist_share.distribute.strategies import Strategy

log = logging.getLogger(__name__)
_NO_MARKER = contextlib.nullcontext()  # outside the window: nothing made per step


class ProfileWindow:
    """Traces steps ``start_step + 1`` to ``start_step + steps`` on the chief.

    The trace goes to ``run_dir/tensorboard/plugins/profile/``, where TensorBoard's profile tab
    finds it; each step in it is marked with its number. With ``horovod_timeline`` every process
    also records Horovod's timeline of the same steps to ``run_dir/horovod_timeline.json``.
    Outside the window nothing is started and each step costs one integer comparison.

    Args:
        config: ``training.profile``.
        run_dir: the run directory; None profiles nothing.
        strategy: the run's strategy (its chief profiles, its timeline is Horovod's).
    """

    def __init__(self, config: ProfileConfig, run_dir: Path | None, strategy: Strategy) -> None:
        self.start = config.start_step
        self.end = config.start_step + config.steps
        self.enabled = bool(config.steps) and run_dir is not None
        self.strategy = strategy
        self.run_dir = run_dir
        self.timeline = config.horovod_timeline
        self.active = False

    def boundaries(self, step: int) -> list[int]:
        """The window's edges after ``step``: a compiled loop must stop there."""
        if not self.enabled:
            return []
        return [edge for edge in (self.start, self.end) if edge > step]

    def at(self, step: int) -> None:
        """Start or stop at a loop boundary (``step`` steps are done)."""
        if not self.enabled:
            return
        if step == self.start and not self.active:
            self._start()
        elif step >= self.end and self.active:
            self._stop()

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Around one compiled call that begins after ``step``: inside the window, a marker
        numbered with the call's first step, which the profile tab's step view reads."""
        if not self.active:
            return _NO_MARKER
        return tf.profiler.experimental.Trace("train", step_num=step + 1, _r=1)

    def close(self) -> None:
        """Stop a window still open (a run that ended or failed inside it)."""
        if self.active:
            self._stop()

    def _start(self) -> None:
        assert self.run_dir is not None
        if self.timeline:
            self.strategy.start_timeline(str(self.run_dir / "horovod_timeline.json"))
        if self.strategy.is_chief:
            tf.profiler.experimental.start(str(self.run_dir / "tensorboard"))
        self.active = True
        log.info("profiling steps %d to %d", self.start + 1, self.end)

    def _stop(self) -> None:
        self.active = False
        if self.strategy.is_chief:
            try:
                tf.profiler.experimental.stop()
            except Exception as e:  # noqa: BLE001 - a lost trace (a full disk) must not end the run
                log.warning("the profiler's trace of steps %d to %d was not written: %s",
                            self.start + 1, self.end, e)  # fmt: skip
        if self.timeline:
            self.strategy.stop_timeline()
