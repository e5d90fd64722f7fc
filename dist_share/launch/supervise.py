"""Running a launch: signal forwarding, process-group kill, exit-code mapping and restarts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dist_share.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ConfigError,
)
from dist_share.launch.commands import WorkerLaunch
from dist_share.launch.hosts import bind_error

# What a relaunch can fix: a lost peer, a crash, a killed process. Not a bad config (2), a
# diverged run (4: it would diverge again), a preemption (75: the machine is going away) or Ctrl-C.
RESTARTABLE = frozenset({EXIT_FAILURE, EXIT_PEER_LOST})
# Seconds a process group gets between SIGTERM (rank saves and exits) and SIGKILL.
TERMINATE_GRACE = 30.0


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` for -9, ``exited with code 3`` otherwise."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def job_exit_code(code: int) -> int:
    """A launcher's or worker's return code as one of ours: a death by signal is a lost peer (3),
    shells' 128+N likewise; documented codes pass through."""
    if code < 0 or (128 < code < 160 and code != EXIT_INTERRUPTED):
        return EXIT_PEER_LOST
    if code in (
        0,
        EXIT_FAILURE,
        EXIT_USAGE,
        EXIT_PEER_LOST,
        EXIT_NONFINITE,
        EXIT_PREEMPTED,
        EXIT_INTERRUPTED,
    ):
        return code
    return EXIT_FAILURE


def _say(text: str) -> None:
    print(f"dist-share launch: {text}", file=sys.stderr, flush=True)


def kill_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the process group led by ``proc``: SIGCONT (a frozen process cannot act on SIGTERM),
    SIGTERM (a rank saves at preemption and exits), SIGKILL after ``grace`` seconds if any
    process of the group is still there. A launcher's workers die with it."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.wait()
            return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _ForwardSignals:
    """While active, SIGTERM/SIGINT/SIGHUP sent to this launcher go to the job's process groups
    (so preemption reaches every rank and they can save) instead of killing only the launcher."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        _say(f"got {signal.Signals(signum).name}; passing it on to the job")
        for pid in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)

    def __enter__(self) -> _ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# horovodrun (Gloo) exits 1 whatever its ranks did and names the first failure in its error.
_HOROVODRUN_FIRST_FAILURE = re.compile(r"^Exit code: (-?\d+)\s*$")


def _echo_and_scan(stream: Any, sink: Any, pattern: re.Pattern, found: list[int]) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        m = pattern.match(line)
        if m and not found:
            found.append(int(m.group(1)))
    stream.close()


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run a launcher in its own process group and return a documented exit code.

    SIGTERM / Ctrl-C sent to us reach every process it started (they save and exit 75 / 130).
    horovodrun's stderr is passed through and read for the exit code of the first rank that
    failed, which horovodrun itself turns into 1.
    """
    scan = Path(argv[0]).name == "horovodrun"
    first_failure: list[int] = []
    with _ForwardSignals() as fwd:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            start_new_session=True,
            stderr=subprocess.PIPE if scan else None,
            text=scan,
        )
        fwd.groups.append(proc.pid)
        reader = None
        if scan:
            reader = threading.Thread(
                target=_echo_and_scan,
                args=(proc.stderr, sys.stderr, _HOROVODRUN_FIRST_FAILURE, first_failure),
                daemon=True,
            )
            reader.start()
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                kill_process_group(proc, TERMINATE_GRACE)
            if reader is not None:
                reader.join(timeout=10)
    if code != 0 and first_failure:
        _say(
            f"{argv[0]} {describe_exit(code)}; the first rank to fail {describe_exit(first_failure[0])}"
        )
        return job_exit_code(first_failure[0])
    if code not in (0, EXIT_INTERRUPTED, EXIT_PREEMPTED):
        _say(f"{argv[0]} {describe_exit(code)}")
    return job_exit_code(code)


def check_local_ports(workers: Sequence[WorkerLaunch]) -> None:
    """Refuse (`ConfigError`, exit 2) when a local worker's TF_CONFIG port is taken: the worker
    would otherwise die in TensorFlow's server start-up with a gRPC traceback."""
    for w in workers:
        if w.argv and w.argv[0] == "ssh":
            continue
        address = json.loads(w.tf_config)["cluster"]["worker"][w.index]
        port = int(address.rsplit(":", 1)[1])
        error = bind_error("", port)
        if error is not None:
            raise ConfigError(
                "--base-port",
                f"port {port} of worker {w.index} ({address}) is in use on this host "
                f"({error.strerror}); choose another --base-port",
            )


def run_multiworker(workers: Sequence[WorkerLaunch], grace: float = TERMINATE_GRACE) -> int:
    """Start every worker (the collective needs all of them) and watch them.

    When one ends with an error or a signal, it is named (index, host, pid, how it ended), the
    others get SIGTERM (SIGKILL after ``grace`` s) and the launch returns its documented exit
    code: a worker killed by a signal -> 3 (`EXIT_PEER_LOST`), otherwise the worker's own code
    (2, 3, 4, 75, 130; anything else -> 1). Returns 0 when every worker succeeded.
    """
    check_local_ports(workers)
    procs: list[subprocess.Popen] = []
    with _ForwardSignals() as fwd:
        try:
            for w in workers:
                env = dict(os.environ)
                if w.argv[0] != "ssh":
                    env["TF_CONFIG"] = w.tf_config
                p = subprocess.Popen(w.argv, env=env, start_new_session=True)
                procs.append(p)
                fwd.groups.append(p.pid)
            while True:
                codes = [p.poll() for p in procs]
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # A preempted job: every worker saves/exits on its own; wait for them.
                    if fwd.received is not None and all(c is not None for c in codes):
                        return job_exit_code(max(c for _, c in failed))
                    if fwd.received is not None:
                        time.sleep(0.2)
                        continue
                    index, code = failed[0]
                    w, p = workers[index], procs[index]
                    alive = sum(c is None for c in codes)
                    _say(
                        f"worker {index} ({w.host}, pid {p.pid}) {describe_exit(code)}; "
                        f"stopping the other {alive} worker(s)"
                    )
                    return job_exit_code(code)
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    kill_process_group(p, grace)


def run_with_restarts(
    start: Callable[[], int],
    max_restarts: int,
    backoff: float = 5.0,
    max_backoff: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Call ``start()`` (one launch of the whole job) until it succeeds, like torchrun's agent.

    A launch that ends with a restartable code (1, 3: `RESTARTABLE`) is started again after
    ``backoff * 2**i`` seconds (capped at ``max_backoff``), at most ``max_restarts`` times; the
    trainer resumes from the newest checkpoint. Bad config (2), non-finite values (4),
    preemption (75) and Ctrl-C (130) are returned at once. Each restart is logged.
    """
    attempt = 0
    while True:
        code = start()
        if code == 0 or code not in RESTARTABLE:
            return code
        if attempt >= max_restarts:
            if max_restarts:
                _say(f"giving up after {max_restarts} restart(s); last exit code {code}")
            return code
        attempt += 1
        delay = min(max_backoff, backoff * 2 ** (attempt - 1))
        _say(
            f"job failed with exit code {code}; restart {attempt}/{max_restarts} in {delay:g} s "
            "(resumes from the last checkpoint)"
        )
        sleep(delay)
