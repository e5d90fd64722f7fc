"""Per-rank heartbeats: a rank that freezes or dies ends the whole job within a bounded time.

Why a watchdog of our own, and what to set: docs/RELIABILITY.md, "Heartbeats".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

from dist_share.errors import EXIT_PEER_LOST, PeerLost

HEARTBEAT_DIR = ".heartbeats"
DEFAULT_STALL_TIMEOUT = 20.0


def _exit_process(code: int) -> None:  # replaced in unit tests of the decision logic
    os._exit(code)


class Heartbeat:
    """Beat for this rank and watch the others.

    A thread rewrites ``RUN_DIR/.heartbeats/rank-R.json`` (a counter, pid, host, last step)
    every ``interval`` seconds, also while the main thread waits in a collective, and watches
    the other ranks' files. A peer whose beat has not moved for ``stall_timeout`` seconds (on
    this rank's monotonic clock: no clock skew) is named and this process exits 3
    (`errors.EXIT_PEER_LOST`). A peer is judged only once its beat was seen to move, so slow
    start-up or a file left by a killed earlier launch is never a stall; a finished rank
    removes its file. ``RUN_DIR`` must be visible to every rank. The job ends at most
    ``stall_timeout + 2 * interval`` seconds after a freeze, plus the launcher's tear-down.

    Args:
        run_dir: the job's run directory (shared by all ranks).
        rank, world_size: this process's place in the job.
        stall_timeout: seconds without a peer's beat before the job is aborted (> 2 * interval).
        interval: seconds between beats.

    Raises:
        ValueError: ``stall_timeout`` not above two intervals.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        interval: float = 1.0,
    ) -> None:
        if stall_timeout <= 2 * interval:
            raise ValueError(
                f"stall_timeout {stall_timeout} must exceed two heartbeat intervals ({interval} s)"
            )
        self.directory = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.stall_timeout, self.interval = stall_timeout, interval
        self.step = 0
        self._beat = 0
        self._started = time.time()
        # peer -> (its beat identity, monotonic time it last moved, whether it moved while seen)
        self._seen: dict[int, tuple[tuple, float, bool]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, rank: int) -> Path:
        return self.directory / f"rank-{rank}.json"

    # -- beating -------------------------------------------------------------------------------
    def beat(self) -> None:
        self._beat += 1
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "beat": self._beat,
            "step": self.step,
            "started": self._started,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".rank-{self.rank}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path(self.rank))

    # -- watching ------------------------------------------------------------------------------
    def _read(self, rank: int) -> dict | None:
        try:
            return json.loads(self.path(rank).read_text())
        except (OSError, ValueError):
            return None

    def stalled_peer(self, now: float | None = None) -> tuple[int, dict, float] | None:
        """The first peer whose beat has not moved for ``stall_timeout`` s: (rank, record, age)."""
        now = time.monotonic() if now is None else now
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            record = self._read(peer)
            if record is None:
                if peer in self._seen:  # its file vanished: it finished (or was cleaned up)
                    self._seen.pop(peer)
                continue
            identity = (record.get("pid"), record.get("host"), record.get("beat"))
            last = self._seen.get(peer)
            if last is None:
                self._seen[peer] = (identity, now, False)
            elif last[0] != identity:
                self._seen[peer] = (identity, now, True)
            elif last[2] and now - last[1] > self.stall_timeout:
                return peer, record, now - last[1]
        return None

    def _abort(self, peer: int, record: dict, age: float) -> None:
        print(
            f"dist-share: rank {peer} (pid {record.get('pid')} on {record.get('host')}) stopped "
            f"answering: no heartbeat for {age:.0f} s (training.stall_timeout="
            f"{self.stall_timeout:g}). Rank {self.rank} aborts the job (exit code "
            f"{EXIT_PEER_LOST}); rerun the same command to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        _exit_process(EXIT_PEER_LOST)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.beat()
            found = self.stalled_peer()
            if found is not None:
                self._abort(*found)
                return

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Heartbeat:
        if self.world_size > 1 and self._thread is None:
            with contextlib.suppress(OSError):
                self.beat()
            self._thread = threading.Thread(
                target=self._run, name="dist_share-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and remove this rank's file (peers then stop watching it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval)
            self._thread = None
        with contextlib.suppress(OSError):
            self.path(self.rank).unlink()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- collective failures as "peer lost" ----------------------------------------------------------
_TASK = re.compile(r"/job:worker/(?:replica:\d+/)?task:(\d+)")
_COLLECTIVE_ERRORS = (
    "UnavailableError",
    "AbortedError",
    "DeadlineExceededError",
    "HorovodInternalError",
)


def as_peer_lost(error: BaseException, rank: int) -> PeerLost | None:
    """`PeerLost` (exit 3) for an error that means another rank died or froze, else None.

    TensorFlow's collectives fail with ``UnavailableError`` / ``AbortedError`` once the
    coordination service notices a worker stopped heart-beating or a connection broke (the
    message names ``/job:worker/task:N``), and with ``DeadlineExceededError`` when a worker's
    own heartbeat to the coordination service (which lives in worker 0) times out. Horovod
    raises ``HorovodInternalError`` (elastic) or an ``UnknownError`` "Horovod has been shut
    down" (Gloo's 30 s receive timeout, a broken MPI peer) when a peer vanishes. Their
    tracebacks say nothing a user can act on.
    """
    text = str(getattr(error, "message", None) or error)
    horovod_down = type(error).__name__ == "UnknownError" and "Horovod has been shut down" in text
    if type(error).__name__ not in _COLLECTIVE_ERRORS and not horovod_down:
        return None
    tasks = sorted({int(t) for t in _TASK.findall(text)} - {rank})
    if tasks:
        who = f"worker {', '.join(map(str, tasks))}"
    elif "CoordinationService/Heartbeat" in text and rank != 0:
        who = "worker 0 (it runs TensorFlow's coordination service)"
    else:
        who = "a peer rank"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return PeerLost(
        f"{who} died or stopped answering ({type(error).__name__}: {first[:300]}). Rank {rank} "
        f"aborts the job (exit code {EXIT_PEER_LOST}); rerun the same command to resume from "
        "the last checkpoint."
    )
