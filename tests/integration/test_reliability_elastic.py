"""Elastic Horovod through the framework itself: ``dist-share launch --launcher horovodrun
--min-np 1 --max-np 2 --host-discovery-script`` running ``dist-share train ... --set
strategy.horovod.elastic=true``, with a host list the test edits, a worker killed and a worker
joining.

Two host names for one machine (``localhost`` and ``127.0.0.1``): Horovod blacklists a host
whose worker failed, and a job whose only host is blacklisted stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.helpers import processes
from tests.helpers.fault_jobs import CONFIG, EXE, env

TIMEOUT = 840
STEPS, COMMIT_EVERY = 600, 5
# The default conv tower (batch norm synchronised over the workers) at a batch large enough
# that the survivor, alone with the whole batch and no collectives, is still training when the
# returning host's new worker has started TensorFlow and joins (several seconds after the test
# restores the host); at batch 32 it could finish the 600 steps first.
MODEL = [
    "--set", "data.train_examples=1024",
    "--set", "data.eval_examples=128",
    "--set", "training.batch_size=128",
    "--set", "training.log_every=1",
    "--set", "training.eval_every=0",
    "--set", "logging.progress_bar=false",
    "--set", "logging.tensorboard=false",
    "--set", "checkpoint.every=100",
]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def _train(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if r["split"] == "train"]


def _wait(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"job ended ({proc.returncode}) before {what}:\n{log.read_text()[-8000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s:\n{log.read_text()[-8000:]}")
        time.sleep(0.2)


def _worker_on(proc: subprocess.Popen, host: str) -> int | None:
    """The pid of the ``dist-share train`` process horovodrun started for ``host``."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for p in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "train" in p.cmdline() and p.environ().get("HOROVOD_HOSTNAME") == host:
                    return p.pid
    return None


def _checkpoint_checksum(run_dir: Path) -> tuple[int, float]:
    """(step, sum of squares of the model variables, in model order) of the last checkpoint."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("model_variables/")]
    keys.sort(key=lambda k: int(k.split("/")[1]))
    total = float(sum(np.sum(np.square(reader.get_tensor(k).astype(np.float64))) for k in keys))
    return int(path.rsplit("-", 1)[1]), total


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 120)
def test_elastic_training_survives_a_lost_worker_and_takes_a_new_one(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    run_dir = tmp_path / "run"
    train = [
        EXE, "train", CONFIG, "--strategy", "horovod", "--run-dir", str(run_dir), *MODEL,
        "--steps", str(STEPS),
        "--set", "strategy.horovod.elastic=true",
        "--set", f"strategy.horovod.commit_every={COMMIT_EVERY}",
    ]  # fmt: skip
    cmd = processes.dist_share_launch(
        "horovodrun", train, "-np", "2", "--min-np", "1", "--max-np", "2",
        "--host-discovery-script", str(discover), "--network-interface", "lo",
        "--blacklist-cooldown-range", "1", "2", hosts=None,
    )  # fmt: skip
    log = tmp_path / "job.log"
    # A joining worker loads TensorFlow while the others wait in the rendezvous: on a loaded
    # 2-core machine that can take longer than Gloo's default 30 s.
    job_env = {**env(), "HOROVOD_GLOO_TIMEOUT_SECONDS": "300"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=job_env,
                                cwd=tmp_path, start_new_session=True)  # fmt: skip
    seen: set[int] = set()
    # The last step logged by 2 workers before the loss (the rollback drops its records later),
    # and whether the job was re-formed with 1 worker.
    two_workers = [0]
    lost = [False]

    def track() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        records = _records(run_dir)
        if not lost[0]:
            lost[0] = any(r["split"] == "elastic" and r["workers"] == 1 for r in records)
            steps = [r["step"] for r in records if r["split"] == "train" and r["workers"] == 2]
            two_workers[0] = max([two_workers[0], *steps])
        return False

    try:
        # 1. both workers train together
        _wait(lambda: track() or any(r["step"] >= 12 and r["workers"] == 2 for r in _train(run_dir)),
              proc, log, "2-worker progress")  # fmt: skip
        # 2. the node "disappears": gone from the host list, its worker killed
        victim = _worker_on(proc, "127.0.0.1")
        assert victim is not None, log.read_text()[-8000:]
        # Horovod orders the hosts itself: the victim may be rank 0 (then the chief changes).
        victim_rank = psutil.Process(victim).environ().get("HOROVOD_RANK")
        hosts.write_text("localhost:1\n")
        os.kill(victim, signal.SIGKILL)
        # the survivor rolls back to its last commit and re-forms the job alone
        _wait(lambda: track() or lost[0], proc, log, "a 1-worker job")
        # 3. the node comes back: a new worker joins at a commit (so the survivor trains alone
        # at least until the first commit after the re-formation)
        hosts.write_text("localhost:1\n127.0.0.1:1\n")
        _wait(lambda: track() or (_worker_on(proc, "127.0.0.1") or victim) != victim, proc, log,
              "a joining worker")  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            track()
            time.sleep(0.2)
        assert proc.poll() == 0, log.read_text()[-8000:]
    finally:
        track()
        for pid in [*seen, proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = [p for p in seen if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
    assert not leftovers

    killed_at = two_workers[0]
    output = log.read_text()
    records = _records(run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "each step once"
    elastic = [r for r in records if r["split"] == "elastic"]
    # Formed with 2 workers; re-formed with 1 after the loss (rolled back to a commit at or
    # before the kill); re-formed with 2 when the new worker joined (at a commit); the end.
    start, *resets, end = elastic
    assert (start["step"], start["workers"]) == (0, 2), elastic
    after_loss = next(r for r in resets if r["workers"] == 1)
    assert after_loss["step"] % COMMIT_EVERY == 0 and after_loss["step"] <= killed_at, elastic
    joined = [r for r in resets if r["step"] > after_loss["step"] and r["workers"] == 2]
    assert joined and joined[0]["step"] % COMMIT_EVERY == 0 and joined[0]["steps_redone"] == 0
    assert "elastic reset: 1 worker(s) from step" in output
    sizes = [r["workers"] for r in train]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    # Every worker ended with the same variables, and they are the final checkpoint's.
    assert end["workers"] == 2 and end["checksum_spread"] == 0.0, end
    step, checksum = _checkpoint_checksum(run_dir)
    assert step == STEPS
    assert abs(checksum - end["variables_checksum"]) <= 1e-9 * abs(checksum)
    # The heartbeat watchdog (which would abort the survivors) is off under elastic.
    assert not (run_dir / ".heartbeats").exists()
    alone = [r for r in train if r["workers"] == 1]
    print(
        f"elastic reset: metrics.jsonl at step {killed_at} when the worker on 127.0.0.1 (rank "
        f"{victim_rank}) was killed; the "
        f"survivor rolled back to the commit of step {after_loss['step']}, redoing "
        f"{after_loss['steps_redone']:.0f} steps (commit_every={COMMIT_EVERY}); it trained "
        f"steps {alone[0]['step']}-{alone[-1]['step']} alone in "
        f"{alone[-1]['time'] - alone[0]['time']:.1f} s; the new worker joined at step "
        f"{joined[0]['step']}, {joined[0]['time'] - alone[-1]['time']:.0f} s after the "
        "survivor's last step alone"
    )


_RUN_ERRORS = """
import os, time
import horovod.tensorflow as hvd, keras, tensorflow as tf
from dist_share.train.loops import elastic
hvd.init()
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
optimizer = keras.optimizers.Adam()
step = tf.Variable(0, dtype=tf.int64)
state = elastic.make_state(model, optimizer, extra_variables=[step], epoch=0)

def train(state):
    print(f"enter: size {hvd.size()} step {int(step)} epoch {state.epoch}", flush=True)
    while int(step) < 20:
        hvd.allreduce(tf.constant(1.0), name="work")  # the step's collective
        step.assign_add(1)
        state.epoch += 1
        if int(step) == 15 and hvd.size() == 2 and hvd.rank() == 0:
            # rank 0 dies after step 15's collective, before the commit of step 15 (the
            # sleep lets the other worker finish the step and reach its commit first)
            time.sleep(2)
            os._exit(1)
        if int(step) % 5 == 0:
            state.commit()
    return int(step)

assert elastic.run(train, state) == 20
# rolled back once, to the commit of step 10: the last one both workers reached
assert state.restores == 1, state.restores

def pipeline_fails(state):
    raise tf.errors.UnknownError(None, None, "a py_function in the input pipeline failed")

try:
    elastic.run(pipeline_fails, state)
except tf.errors.UnknownError:
    print("propagated", flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(660)
def test_elastic_run_rolls_back_to_a_commit_every_worker_reached_and_propagates_other_errors(
    tmp_path,
):
    """Two elastic workers; rank 0 dies after a step's collective and before that step's
    commit. The survivor must roll back (variables and attributes) to the previous commit, the
    last point both reached: Horovod's own commit saves before meeting the others, so without
    `make_state`'s barrier it would keep the step the dead worker never finished (in the
    trainer, the chief dies before writing the step's record, and metrics.jsonl misses it).
    Then any TensorFlow UnknownError that is not a lost peer propagates (Horovod 0.28.1's own
    TF wrapper returns None for it, as if training had finished)."""
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    discover.chmod(0o755)
    script = tmp_path / "errors.py"
    script.write_text(_RUN_ERRORS)
    cmd = ["horovodrun", "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script",
           str(discover), "--network-interface", "lo", sys.executable, str(script)]  # fmt: skip
    env = processes.worker_env()
    result = processes.run_job(cmd, env=env, timeout=600)
    assert result.returncode == 0, result.output[-4000:]
    entries = re.findall(r"enter: size (\d) step (\d+) epoch (\d+)", result.output)
    assert entries.count(("2", "0", "0")) == 2, result.output[-4000:]
    # the survivor's second entry: alone, at step 10 with the attribute of step 10 (not 15)
    assert entries[2:] == [("1", "10", "10")], result.output[-4000:]
    assert "propagated" in result.output, result.output[-4000:]
