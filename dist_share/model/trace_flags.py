"""Switches a ``with`` block sets for the code it traces, read deep inside layers and losses."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class TraceFlag:
    """On inside `set` (nestable), per thread: a tf.distribute replica traces in its own thread,
    and what one replica's code switches on must not reach another's."""

    def __init__(self) -> None:
        self._state = threading.local()

    @property
    def on(self) -> bool:
        return getattr(self._state, "depth", 0) > 0

    @contextlib.contextmanager
    def set(self) -> Iterator[None]:
        depth = getattr(self._state, "depth", 0)
        self._state.depth = depth + 1
        try:
            yield
        finally:
            self._state.depth = depth
