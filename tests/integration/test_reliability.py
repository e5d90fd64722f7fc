"""Faults without TensorFlow: the run-directory lock, file modes, heartbeats, the multi-worker
launcher's handling of a dead or frozen worker, and --max-restarts. Real processes throughout
(short Python programs stand in for ranks where the trainer itself is not what is tested)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from dist_share.errors import RunDirBusy
from dist_share.launch.commands import WorkerLaunch, tf_config
from dist_share.launch.hosts import free_port
from dist_share.launch.supervise import (
    describe_exit,
    job_exit_code,
    run_multiworker,
    run_with_restarts,
)
from dist_share.run import directory as rundir
from dist_share.run.resolve import validate
from dist_share.train.checkpoints import remove_partial_checkpoints
from dist_share.train.guards import watchdog
from tests.helpers.paths import ROOT
from tests.helpers.processes import dist_share_launch
from tests.integration.conftest import mounted_tmpfs

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CFG = validate({"model": {"family": "siamese"}, "training": {"steps": 1}})


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _reap(proc: subprocess.Popen) -> None:
    """Kill a test's process and everything it started; the test then asserts nothing is left."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children, proc]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            p.kill()
    proc.wait(timeout=10)


# -- run directory -----------------------------------------------------------------------------
def test_lock_refuses_a_second_holder_and_is_freed_when_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        _python(f"""
            import time
            from dist_share.run import directory as rundir
            rundir.lock({str(run)!r})
            print("locked", flush=True)
            time.sleep(120)
        """),
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=rf"is in use by pid {holder.pid} on "):
            rundir.lock(run)
        # The lock file is bookkeeping: a directory holding only it is still a new run.
        assert rundir.check(run, CFG) == "new"
        holder.kill()  # no clean-up code runs: the kernel drops the flock
        holder.wait(timeout=10)
        lock = rundir.lock(run)
        lock.release()
    finally:
        _reap(holder)


def test_config_yaml_gets_the_same_mode_as_the_other_files(tmp_path):
    old = os.umask(0o022)
    try:
        rundir.prepare(tmp_path / "run", CFG, "new")
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "run" / rundir.CONFIG_FILE).stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o644


def test_partial_checkpoint_files_are_removed(tmp_path):
    for name in ("ckpt-6_temp/part-0", "checkpoint.tmp123"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "ckpt-3.index").write_text("keep")
    (tmp_path / "checkpoint").write_text("keep")
    removed = remove_partial_checkpoints(tmp_path)
    assert sorted(removed) == ["checkpoint.tmp123", "ckpt-6_temp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "ckpt-3.index"]


# -- heartbeats --------------------------------------------------------------------------------
BEATING_RANK = """
    import sys, time
    from dist_share.train.guards import watchdog
    hb = watchdog.Heartbeat(sys.argv[1], int(sys.argv[2]), 2, stall_timeout=3, interval=0.25)
    hb.start()
    print("beating", flush=True)
    time.sleep(float(sys.argv[3]))
    hb.stop()
"""


def _beating_rank(run_dir: Path, rank: int, seconds: float) -> subprocess.Popen:
    argv = [*_python(BEATING_RANK), str(run_dir), str(rank), str(seconds)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout.readline().strip() == "beating"
    return proc


def test_heartbeat_flags_a_frozen_peer_and_ignores_a_leftover_file(tmp_path):
    # A file of an earlier, killed launch: never moves, must never count as a stall.
    hb_dir = tmp_path / watchdog.HEARTBEAT_DIR
    hb_dir.mkdir()
    (hb_dir / "rank-2.json").write_text('{"rank": 2, "pid": 1, "host": "x", "beat": 7}')
    me = watchdog.Heartbeat(tmp_path, rank=0, world_size=3, stall_timeout=3, interval=0.25)
    peer = _beating_rank(tmp_path, 1, 60)
    try:
        t = time.monotonic()
        while time.monotonic() - t < 1.5:  # the peer's beat moves: alive
            assert me.stalled_peer() is None
            time.sleep(0.1)
        peer.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        _wait_for(lambda: me.stalled_peer() is not None, 10, "the frozen peer to be noticed")
        rank, record, age = me.stalled_peer()
        assert rank == 1 and record["pid"] == peer.pid and age > 3
        # Bounded: stall_timeout after the last beat seen (which may precede the freeze by a
        # beat interval and a poll), plus slack for a loaded machine.
        assert 2.5 <= time.monotonic() - frozen_at < 10
    finally:
        peer.send_signal(signal.SIGCONT)
        _reap(peer)


def test_a_rank_whose_peer_freezes_exits_3_naming_it(tmp_path):
    frozen = _beating_rank(tmp_path, 1, 60)
    survivor = _beating_rank(tmp_path, 0, 60)
    try:
        time.sleep(1.0)
        frozen.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert survivor.wait(timeout=20) == 3
        assert time.monotonic() - t0 < 3 + 2
        err = survivor.stderr.read()
        assert f"rank 1 (pid {frozen.pid} on" in err and "stopped answering" in err
        assert "exit code 3" in err and "rerun the same command to resume" in err
    finally:
        frozen.send_signal(signal.SIGCONT)
        _reap(frozen)
        _reap(survivor)


def test_a_finished_peer_is_not_a_stall(tmp_path):
    done = _beating_rank(tmp_path, 1, 0.8)
    me = watchdog.Heartbeat(tmp_path, rank=0, world_size=2, stall_timeout=3, interval=0.25)
    assert me.stalled_peer() is None
    assert done.wait(timeout=20) == 0
    assert not me.path(1).exists()  # stop() removed it
    time.sleep(3.5)
    assert me.stalled_peer() is None


# -- the multi-worker launcher -----------------------------------------------------------------
def _workers(n: int, code: str) -> list[WorkerLaunch]:
    addrs = [f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(n)]
    return [WorkerLaunch("localhost", i, tf_config(addrs, i), _python(code)) for i in range(n)]


SLEEPING_WORKER = """
    import json, os, time
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    open(os.environ["PIDS"] + f"/{index}", "w").write(str(os.getpid()))
    time.sleep(120)
"""


@pytest.mark.parametrize("fault", ["SIGKILL", "exit4"])
def test_multiworker_launcher_names_the_dead_worker_and_stops_the_rest(
    tmp_path, monkeypatch, capfd, fault
):
    monkeypatch.setenv("PIDS", str(tmp_path))
    code = SLEEPING_WORKER
    if fault == "exit4":  # worker 1 stops itself with a documented code: it is passed on
        code = code.replace("time.sleep(120)", "time.sleep(1 if index == 1 else 120); os._exit(4)")
    workers = _workers(3, code)
    import threading

    def kill_worker_1():
        _wait_for(lambda: (tmp_path / "1").exists() and (tmp_path / "0").exists(), 30, "workers")
        time.sleep(0.2)
        if fault == "SIGKILL":
            os.kill(int((tmp_path / "1").read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_worker_1)
    killer.start()
    t0 = time.monotonic()
    rc = run_multiworker(workers, grace=5)
    killer.join()
    assert time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    pid1 = int((tmp_path / "1").read_text())
    if fault == "SIGKILL":
        assert rc == 3
        assert f"worker 1 (localhost, pid {pid1}) was killed by SIGKILL" in err
    else:
        assert rc == 4
        assert f"worker 1 (localhost, pid {pid1}) exited with code 4" in err
    assert "stopping the other 2 worker(s)" in err
    for i in range(3):
        assert not psutil.pid_exists(int((tmp_path / str(i)).read_text()))


def test_multiworker_launcher_kills_a_frozen_worker_when_another_fails(tmp_path, monkeypatch):
    """A SIGSTOPped process ignores SIGTERM until continued: the launcher sends SIGCONT too."""
    monkeypatch.setenv("PIDS", str(tmp_path))
    code = SLEEPING_WORKER.replace(
        "time.sleep(120)", "time.sleep(120 if index == 0 else 1.5); os._exit(3)"
    )
    workers = _workers(2, code)
    import threading

    def freeze_worker_0():
        _wait_for(lambda: (tmp_path / "0").exists(), 30, "worker 0")
        os.kill(int((tmp_path / "0").read_text()), signal.SIGSTOP)

    t = threading.Thread(target=freeze_worker_0)
    t.start()
    t0 = time.monotonic()
    assert run_multiworker(workers, grace=5) == 3
    t.join()
    # SIGCONT + SIGTERM end it at once; without SIGCONT it would take the SIGKILL after 5 s.
    assert time.monotonic() - t0 < 5
    assert not psutil.pid_exists(int((tmp_path / "0").read_text()))


def test_exit_codes_are_mapped_to_documented_ones():
    assert job_exit_code(-9) == 3
    assert job_exit_code(137) == 3  # a shell's 128 + SIGKILL
    assert job_exit_code(247) == 1  # the old undocumented code
    for code in (0, 1, 2, 3, 4, 75, 130):
        assert job_exit_code(code) == code
    assert describe_exit(-15) == "was killed by SIGTERM"


# -- restarts ----------------------------------------------------------------------------------
def test_run_with_restarts_backs_off_and_gives_up(capfd):
    delays: list[float] = []
    codes = iter([3, 1, 0])
    assert run_with_restarts(lambda: next(codes), 5, backoff=2, sleep=delays.append) == 0
    assert delays == [2, 4]
    codes = iter([3, 3, 3, 3])
    assert run_with_restarts(lambda: next(codes), 2, backoff=1, sleep=delays.append) == 3
    err = capfd.readouterr().err
    assert "job failed with exit code 3; restart 1/5 in 2 s" in err
    assert "restart 2/2 in 2 s" in err and "giving up after 2 restart(s); last exit code 3" in err
    for final in (2, 4, 75, 130):  # not fixable by a rerun: returned at once
        calls: list[int] = []
        assert run_with_restarts(lambda f=final, c=calls: c.append(1) or f, 5) == final
        assert len(calls) == 1


def test_launch_max_restarts_relaunches_the_whole_job(tmp_path):
    """Through the CLI: a 2-worker job whose worker 1 crashes on the first attempt."""
    marker = tmp_path / "attempts"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
            import json, os, sys, time
            index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
            if index == 1:
                with open({str(marker)!r}, "a") as f:
                    f.write("x")
                if len(open({str(marker)!r}).read()) == 1:
                    os.kill(os.getpid(), 9)
            time.sleep(0.5)
        """)
    )
    env = {**ENV, "MAX_RESTARTS": "2"}
    port = str(free_port(count=2))
    cmd = dist_share_launch("multiworker", [sys.executable, str(script)], "--base-port", port)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "worker 1 (localhost, pid" in proc.stderr and "killed by SIGKILL" in proc.stderr
    assert "job failed with exit code 3; restart 1/2 in 5 s" in proc.stderr
    assert marker.read_text() == "xx"


def test_launch_scripts_honour_max_restarts(tmp_path):
    """launch/multiworker.sh with MAX_RESTARTS: the stand-in CLI is killed on its first run."""
    marker = tmp_path / "attempts"
    fake_cli = tmp_path / "fake-dist-share"
    fake_cli.write_text(
        "#!/usr/bin/env bash\n"
        f"echo x >> {marker}\n"
        f'if [ "$(wc -l < {marker})" = 1 ]; then kill -9 $$; fi\n'
        'echo "trained: $*"\n'
    )
    fake_cli.chmod(0o755)
    env = {
        **ENV,
        "MAX_RESTARTS": "1",
        "RESTART_BACKOFF": "1",
        "DIST_SHARE": str(fake_cli),
        "INDEX": "0",
        "WORKERS": "localhost:1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "multiworker.sh"), "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "multiworker.sh: job failed with exit code 3; restart 1/1 in 1 s" in proc.stderr
    assert "--steps 5" in proc.stdout and marker.read_text().count("x") == 2
    marker.unlink()
    env["MAX_RESTARTS"] = "0"  # the default: exec, no loop
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "multiworker.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == -9 and "restart" not in proc.stderr  # exec: no wrapper left


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs: root can write anywhere else."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


def test_an_unwritable_run_dir_is_a_config_error_naming_it(read_only_dir):
    from dist_share.errors import ConfigError

    run = read_only_dir / "run"
    assert rundir.check(run, CFG) == "new"  # deciding touches nothing
    with pytest.raises(
        ConfigError, match=r"cannot write the run directory .*Read-only file system"
    ):
        rundir.lock(run)
    with pytest.raises(ConfigError) as info:
        rundir.prepare(run, CFG, "new")
    assert info.value.path == "--run-dir" and "choose a writable --run-dir" in str(info.value)


def test_launch_refuses_a_taken_port_and_a_missing_launcher(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [sys.executable, "-c", "pass"]
        cmd = dist_share_launch("multiworker", argv, "--base-port", str(port - 1))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 2, out.stderr
    assert f"--base-port: port {port} of worker 1 (localhost:{port}) is in use" in out.stderr
    env = {**ENV, "PATH": str(tmp_path)}  # neither horovodrun nor mpirun here
    for launcher in ("horovodrun", "mpirun"):
        cmd = dist_share_launch(launcher, ["true"], "-np", "2", hosts=None)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2 and f"{launcher} is not on PATH" in out.stderr, out.stderr


# -- bad input files ---------------------------------------------------------------------------
def _pairs(n: int = 8, **change) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "left": rng.random((n, 8, 8, 1)).astype("float32"),
        "right": rng.random((n, 8, 8, 1)).astype("float32"),
        "labels": rng.integers(0, 2, n).astype("float32"),
    }
    arrays.update(change)
    return arrays


def _nan_left():
    a = _pairs()["left"]
    a[5, 2, 3, 0] = float("nan")
    return a


BAD_NPZ = {
    "nan_features": ("siamese", _pairs(left=_nan_left()),
                     "stream 'left' holds NaN values in 1 example(s), the first at index 5"),
    "labels_out_of_range": ("siamese", _pairs(labels=__import__("numpy").arange(-5, 3)),
                            "'labels' must be 0 or 1 for the siamese family"),
    "string_labels": ("siamese", _pairs(labels=__import__("numpy").array(["same", "diff"] * 4)),
                      "'labels' has dtype <U4; expected numbers"),
    "string_stream": ("siamese", _pairs(right=__import__("numpy").array(["x"] * 8)),
                      "stream 'right' has dtype <U1"),
    "empty": ("siamese", _pairs(0), "holds no examples"),
    "missing_stream": ("siamese", {k: v for k, v in _pairs().items() if k != "right"},
                       "expects 2 streams ['left', 'right']"),
    "class_labels": ("multiview", {**{f"view{i}": _pairs()["left"] for i in range(3)},
                                   "labels": __import__("numpy").array([0, 1, 2.5, 3, 4, 5, 6, -1])},
                     "must be integer classes"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_files_are_rejected_naming_file_and_stream(tmp_path, monkeypatch, capsys, case):
    """`dist-share config` (in this process: the CLI's own entry point, no TensorFlow start-up
    per case) exits 2 with one line naming the file and what is wrong."""
    import numpy as np

    from dist_share import cli

    family, arrays, needle = BAD_NPZ[case]
    np.savez(tmp_path / "data.npz", **arrays)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{family: {family}}}\ndata: {{source: npz, train_path: data.npz}}\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "data.npz" in err, err
    assert "Traceback" not in err


def test_collective_errors_become_exit_3_naming_the_worker():
    import tensorflow as tf

    frozen_chief = tf.errors.DeadlineExceededError(
        None, None, "Collective ops is aborted by: Deadline Exceeded\nRPC: "
        "/tensorflow.CoordinationService/Heartbeat"
    )  # fmt: skip
    lost = watchdog.as_peer_lost(frozen_chief, rank=1)
    assert lost.exit_code == 3
    assert lost.message.startswith("worker 0 (it runs TensorFlow's coordination service) died")
    unhealthy = tf.errors.UnavailableError(
        None, None, "The following tasks are unhealthy (stopped sending heartbeats):\n"
        "/job:worker/replica:0/task:1"
    )  # fmt: skip
    assert watchdog.as_peer_lost(unhealthy, rank=0).message.startswith("worker 1 died")
    gloo = tf.errors.UnknownError(None, None, "Horovod has been shut down. This was caused by")
    assert watchdog.as_peer_lost(gloo, rank=0).message.startswith("a peer rank died")
    assert watchdog.as_peer_lost(tf.errors.UnknownError(None, None, "other"), rank=0) is None
    assert watchdog.as_peer_lost(ValueError("x"), rank=0) is None
