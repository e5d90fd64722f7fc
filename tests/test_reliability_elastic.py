"""Elastic Horovod on this machine: a host list the test edits, a worker killed and a worker
joining, with horovodrun --min-np 1 --max-np 2 --host-discovery-script.

Two host names for one machine (``localhost`` and ``127.0.0.1``): Horovod blacklists a host
whose worker failed, and a job whose only host is blacklisted stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dist_share import processes

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "workers" / "elastic_train.py"
TIMEOUT = 480


def _records(out: Path, host: str) -> list[dict]:
    path = out / f"progress-{host}.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"job ended ({proc.returncode}) before {what}:\n{log.read_text()[-6000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s:\n{log.read_text()[-6000:]}")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_elastic_horovod_survives_a_lost_worker_and_takes_a_new_one(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    steps, commit_every = 80, 5
    cmd = [
        "horovodrun", "-np", "2", "--min-np", "1", "--max-np", "2",
        "--host-discovery-script", str(discover), "--network-interface", "lo",
        "--blacklist-cooldown-range", "1", "2",
        sys.executable, str(WORKER), "--out", str(out), "--steps", str(steps),
        "--commit-every", str(commit_every), "--delay", "0.25",
    ]  # fmt: skip
    log = tmp_path / "job.log"
    # A joining worker loads TensorFlow while the others wait in the rendezvous: on a loaded
    # 2-core machine that can take longer than Gloo's default 30 s.
    env = processes.worker_env({"PYTHONPATH": str(ROOT), "HOROVOD_GLOO_TIMEOUT_SECONDS": "180"})
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    seen: set[int] = set()
    try:
        # 1. both workers train together
        def at(host, pred):
            return any(pred(r) for r in _records(out, host))

        _wait(lambda: at("127.0.0.1", lambda r: r["event"] == "step" and r["step"] >= 12), proc,
              log, "2-worker progress")  # fmt: skip
        # 2. the node "disappears": gone from the host list, its worker killed
        victim = _records(out, "127.0.0.1")[-1]["pid"]
        hosts.write_text("localhost:1\n")
        killed_at = max(r["step"] for r in _records(out, "localhost") if r["event"] == "step")
        os.kill(victim, signal.SIGKILL)
        # the survivor rolls back to its last commit and goes on alone
        _wait(lambda: at("localhost", lambda r: r["event"] == "step" and r["size"] == 1
                         and r["step"] >= killed_at + 6), proc, log, "1-worker progress")  # fmt: skip
        # 3. the node comes back: a new worker joins at the next commit
        hosts.write_text("localhost:1\n127.0.0.1:1\n")
        _wait(lambda: at("127.0.0.1", lambda r: r["event"] == "enter" and r["pid"] != victim),
              proc, log, "a joining worker")  # fmt: skip
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-6000:]
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        for pid in [*seen, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    survivor = _records(out, "localhost")
    enters = [r for r in survivor if r["event"] == "enter"]
    # Entered at the start, after the loss (rolled back: restores counted) and after the join.
    assert len(enters) >= 3, enters
    after_loss = enters[1]
    assert after_loss["restores"] >= 1 and after_loss["size"] == 1
    assert after_loss["step"] % commit_every == 0 and after_loss["step"] <= killed_at
    lost = killed_at - after_loss["step"]
    joined = [r for r in _records(out, "127.0.0.1") if r["event"] == "enter" and r["pid"] != victim]
    assert joined[0]["size"] == 2 and joined[0]["step"] % commit_every == 0
    sizes = [r["size"] for r in survivor if r["event"] == "step"]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == steps and final["size"] == 2
    assert abs(final["sum"] - 2 * final["checksum"]) < 1e-9 * max(1.0, final["sum"])  # in sync
    print(
        f"elastic reset: killed at step {killed_at}, rolled back to {after_loss['step']} "
        f"(steps lost: {lost}); joined at step {joined[0]['step']}"
    )
