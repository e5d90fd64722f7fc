"""Run the slow, independent parts of the tests two at a time.

Most of a short training process is TensorFlow's start on one core, so a job alone leaves the
other core of a 2-core machine idle. `start` queues a job on one pool shared by the whole test
session (two run at a time, so the jobs of several modules never pile up on the cores);
`result` waits for it and re-raises what it raised. A test module names the jobs its tests
need with ``pytest.mark.background(key, ...)`` and builds them in ``background_jobs(root)``;
the conftest starts the jobs of the selected tests when the module begins, so they run while
the module's other tests do. Every job bounds its own processes with a timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="background")
_JOBS: dict[str, Future] = {}
_LOCK = threading.Lock()


def start(key: str, fn: Callable[[], Any]) -> None:
    """Queue ``fn`` under ``key`` unless a job of that key was started already."""
    with _LOCK:
        if key not in _JOBS:
            _JOBS[key] = _POOL.submit(fn)


def result(key: str) -> Any:
    """The result of job ``key``, once it has ended."""
    with _LOCK:
        if key not in _JOBS:
            raise KeyError(f"no background job {key!r} was started")
        job = _JOBS[key]
    return job.result()


def concurrently(*fns: Callable[[], Any]) -> list[Any]:
    """Run independent callables side by side and return their results in order. Its own
    threads, not the shared pool: a pool job may call it without waiting on itself."""
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(fn) for fn in fns]
        return [f.result() for f in futures]
