"""Faults in real training jobs: a rank killed or frozen under horovodrun, mpirun and
multi-worker, an automatic restart that resumes exactly, a full disk while checkpointing, and
two runs on one run directory. Every job has a timeout and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dist_share.run.resolve import load_config
from tests.helpers.background import concurrently
from tests.helpers.fault_jobs import CONFIG, EXE, SMALL, TIMEOUT, Job, checkpoint_values, env
from tests.helpers.runs import metrics
from tests.integration.conftest import mounted_tmpfs


def _assert_same_variables(want_dir: Path, got_dir: Path) -> None:
    want, got = checkpoint_values(want_dir), checkpoint_values(got_dir)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_multiworker_kill_restart_and_preemption_resume_exactly(tmp_path):
    """One uninterrupted 2-worker run is the reference for two interrupted ones:

    * SIGKILL of worker 1: the launcher names it and exits 3; --max-restarts relaunches, the
      job resumes from the last checkpoint;
    * SIGTERM to worker 1 only: both workers stop after the same step, the chief saves that
      step, the job exits 75; the same command run again resumes.

    Both end with variables equal (1e-6) to the reference and metrics.jsonl holds each step once.
    """
    steps = ["--steps", "60", "--set", "checkpoint.every=10"]
    reference = Job("multiworker", tmp_path / "reference", steps)
    assert reference.wait() == 0, reference.output()

    faulty = Job("multiworker", tmp_path / "faulty", steps, ["--max-restarts", "1"])
    try:
        at_kill = faulty.wait_for_step(13)
        pid = faulty.rank_pid(1)
        os.kill(pid, signal.SIGKILL)
        assert faulty.wait() == 0, faulty.output()
    finally:
        faulty.close()
    out = faulty.output()
    assert f"worker 1 (localhost, pid {pid}) was killed by SIGKILL" in out
    assert "job failed with exit code 3; restart 1/1" in out
    assert not faulty.leftovers()
    assert faulty.steps() == list(range(1, 61)), "each step once after the resume"
    print(f"SIGKILL at step >= {at_kill}; resumed from step 10: {at_kill - 10}+ steps redone")
    _assert_same_variables(tmp_path / "reference", tmp_path / "faulty")

    preempted = Job("multiworker", tmp_path / "preempted", steps)
    try:
        preempted.wait_for_step(13)
        os.kill(preempted.rank_pid(1), signal.SIGTERM)
        assert preempted.wait() == 75, preempted.output()
    finally:
        preempted.close()
    out = preempted.output()
    assert "rank 1 got SIGTERM; stopping at the next step boundary" in out
    stopped = int(out.split("every rank stopped after step ")[1].split()[0])
    assert stopped > 13 and stopped % 10, out  # not a regular checkpoint step: saved for this
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(tmp_path / "preempted" / "checkpoints"))
    assert latest.endswith(f"ckpt-{stopped}"), latest
    assert not preempted.leftovers()
    resumed = Job("multiworker", tmp_path / "preempted", steps)
    assert resumed.wait() == 0, resumed.output()
    assert resumed.steps() == list(range(1, 61)), "each step once after the resume"
    _assert_same_variables(tmp_path / "reference", tmp_path / "preempted")


FAULT_CASES = [
    # A frozen chief is the hard case for MultiWorkerMirrored: TensorFlow's coordination
    # service, which notices a worker that stops heart-beating, runs inside the chief.
    ("multiworker", "SIGSTOP", 0),
    ("horovodrun", "SIGSTOP", 1),
    ("mpirun", "SIGSTOP", 0),
    ("horovodrun", "SIGKILL", 1),
    ("mpirun", "SIGKILL", 1),
]
STALL_TIMEOUT = 10


@pytest.fixture(scope="module")
def fault_results(tmp_path_factory) -> dict:
    """The five jobs run at the same time (most of a fault case is waiting: for a stall to be
    noticed, for a launcher to tear down), each faulted as soon as it has trained a few steps.
    Every job is timed from its own fault to its own exit."""
    args = ["--steps", "100000", "--set", "checkpoint.every=3",
            "--set", f"training.stall_timeout={STALL_TIMEOUT}"]  # fmt: skip
    root = tmp_path_factory.mktemp("faults")
    jobs = {case: Job(case[0], root / "-".join(map(str, case)), args) for case in FAULT_CASES}
    results: dict = {}
    try:
        pending = dict(jobs)
        deadline = time.monotonic() + TIMEOUT
        faulted: dict = {}
        while pending:
            for case, job in list(pending.items()):
                job.track()
                if case not in faulted:
                    done = job.steps()
                    if done and done[-1] >= 4:
                        time.sleep(1.5)  # a few more beats of every rank after its start-up
                        pid = job.rank_pid(case[2])
                        os.kill(pid, getattr(signal, case[1]))
                        faulted[case] = (pid, time.monotonic())
                    elif job.proc.poll() is not None:
                        results[case] = {"error": f"ended early:\n{job.output()}"}
                        del pending[case]
                elif job.proc.poll() is not None:
                    pid, t0 = faulted[case]
                    results[case] = {"code": job.proc.returncode, "pid": pid,
                                     "elapsed": time.monotonic() - t0,
                                     "leftovers": job.record_survivors()}  # fmt: skip
                    del pending[case]
            if time.monotonic() > deadline:
                for case, job in pending.items():
                    results[case] = {"error": f"still running after {TIMEOUT} s:\n{job.output()}"}
                break
            time.sleep(0.1)
    finally:
        for job in jobs.values():
            job.close()
    for case, job in jobs.items():
        results[case].update(output=job.output(), run_dir=job.run_dir)
    return results


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 120)
@pytest.mark.parametrize("launcher,fault,rank", FAULT_CASES)
def test_a_dead_or_frozen_rank_ends_the_job(fault_results, launcher, fault, rank):
    """The job exits 3 within stall_timeout plus tear-down, names the rank, leaves no process,
    and the newest checkpoint is readable."""
    result = fault_results[(launcher, fault, rank)]
    out = result["output"]
    assert "error" not in result, result.get("error")
    code, pid, elapsed = result["code"], result["pid"], result["elapsed"]
    print(f"{launcher} {fault} rank {rank}: job exited {code} {elapsed:.1f} s after the fault")
    assert code == 3, out
    if fault == "SIGSTOP":
        named = f"rank {rank} (pid {pid} on" in out and "stopped answering" in out
        named = named or f"worker {rank} died or stopped answering" in out
        named = named or f"worker {rank} (it runs TensorFlow's coordination service)" in out
        assert named, out
        # the bound: stall_timeout + beats + launcher tear-down
        assert elapsed < STALL_TIMEOUT + 50, out
    assert not result["leftovers"], f"processes left: {result['leftovers']}"
    assert checkpoint_values(result["run_dir"])  # the newest checkpoint reads


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MB file system: room for a few checkpoints, then full."""
    with mounted_tmpfs(tmp_path / "tmpfs", "size=6m") as mnt:
        yield mnt


def _train(run_dir: Path, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [EXE, "train", CONFIG, "--run-dir", str(run_dir), *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_while_checkpointing_fails_clearly_and_keeps_the_previous_one(small_tmpfs):
    run = small_tmpfs / "run"
    first = _train(run, "--steps", "3", "--set", "checkpoint.every=3")
    assert first.returncode == 0, first.stderr
    filler = small_tmpfs / "filler"
    # Leave 16 KB: metrics lines fit, a checkpoint (about 100 KB) does not.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - 16 * 1024))
    full = _train(run, "--steps", "6", "--set", "checkpoint.every=3")
    assert full.returncode == 1, full.stderr
    assert "could not write the checkpoint of step 6" in full.stderr
    assert "No space left on device" in full.stderr
    assert "the previous checkpoint ckpt-3 is intact; rerun to resume from it" in full.stderr
    assert "Traceback" not in full.stderr and len(full.stderr.splitlines()) < 10, full.stderr
    assert not [p.name for p in (run / "checkpoints").iterdir() if "_temp" in p.name]
    filler.unlink()
    again = _train(run, "--steps", "6", "--set", "checkpoint.every=3")
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "ckpt-6.index" in names and "ckpt-3.index" in names


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_train_on_a_busy_run_dir_is_refused_and_a_killed_run_frees_it(tmp_path):
    run = tmp_path / "run"
    cmd = [EXE, "train", CONFIG, "--run-dir", str(run), *SMALL, "--set", "checkpoint.every=5"]
    first = subprocess.Popen([*cmd, "--steps", "100000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env(),
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        # Any checkpoint: a step takes ~2 ms here, so ckpt-5 is rotated out (max_to_keep) long
        # before a 0.2 s poll may see it (a CI run waited 420 s for it while 49,000 steps ran).
        while not list((run / "checkpoints").glob("ckpt-*.index")):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--steps", "100000"], capture_output=True, text=True,
                                timeout=TIMEOUT, env=env())  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"is in use by pid {first.pid} on" in second.stderr
        lines_before = len((run / "metrics.jsonl").read_text().splitlines())
        assert lines_before > 0
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    import tensorflow as tf

    saved = int(tf.train.latest_checkpoint(str(run / "checkpoints")).rsplit("-", 1)[1])
    last = subprocess.run([*cmd, "--steps", str(saved + 2)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env())  # fmt: skip
    assert last.returncode == 0, last.stderr
    steps = [r["step"] for r in metrics(run, "train")]
    assert steps == list(range(1, saved + 3)), "each step once after the resume"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_keras_fit_preemption_saves_and_resumes_exactly(tmp_path):
    """The Keras fit path: SIGTERM -> exit 75 with the checkpoint of the step it stopped at;
    the rerun resumes and ends equal to an uninterrupted fit."""
    # Enough steps that the SIGTERM, sent once step 1 is logged, lands mid-run: 40 steps of
    # this model took less than the 0.1 s poll on a quiet machine and the run ended with 0.
    fit = ["--set", "training.loop=keras_fit", "--set", "checkpoint.every=500", "--steps", "400"]
    run = tmp_path / "run"

    def preempted_then_resumed() -> tuple[str, subprocess.CompletedProcess]:
        cmd = [EXE, "train", CONFIG, "--run-dir", str(run), *SMALL, *fit]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env(), start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + TIMEOUT
            while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 75
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return err, _train(run, *fit)

    # The uninterrupted reference is independent of the preempted run and its rerun.
    reference, (err, again) = concurrently(
        lambda: _train(tmp_path / "reference", *fit), preempted_then_resumed
    )
    assert reference.returncode == 0, reference.stderr
    assert "every rank stopped after step" in err and "Traceback" not in err, err
    stopped = int(err.split("every rank stopped after step ")[1].split()[0])
    assert 0 < stopped < 400
    assert again.returncode == 0, again.stderr
    _assert_same_variables(tmp_path / "reference", run)


def _strict_records(run_dir: Path) -> list[dict]:
    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x, parse_constant=reject) for x in lines]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_diverging_run_stops_with_exit_4_or_skips_on_every_replica(tmp_path):
    """learning_rate=1e8 goes NaN within a few steps. stop: exit 4 naming the step and the
    variable, no non-finite checkpoint. skip (2 replicas, MirroredStrategy): the steps are
    skipped alike on both replicas and counted; metrics.jsonl is strict JSON throughout."""
    import tensorflow as tf

    diverge = ["--set", "optimizer.learning_rate=1e8", "--set", "checkpoint.every=1"]
    skip_args = ["--steps", "12", *diverge, "--strategy", "mirrored",
                 "--set", "strategy.num_cpu_devices=2", "--set", "training.on_nonfinite=skip",
                 # clipped, Adam's steps stay finite (~lr); only the NaN gradients are skipped
                 "--set", "optimizer.clipnorm=1.0"]  # fmt: skip
    stop, skip = concurrently(  # two independent runs, side by side
        lambda: _train(tmp_path / "stop", "--steps", "30", *diverge),
        lambda: _train(tmp_path / "skip", *skip_args),
    )
    assert stop.returncode == 4, stop.stderr
    assert "non-finite values at step" in stop.stderr and "Traceback" not in stop.stderr
    assert "training.on_nonfinite: skip" in stop.stderr
    # The reduced gradient of a model variable, the loss, or (a finite gradient that made
    # Adam's moments overflow) an optimizer slot: named either way.
    assert "variable '" in stop.stderr or "the loss is not finite" in stop.stderr
    step = int(stop.stderr.split("non-finite values at step ")[1].split(":")[0])
    latest = tf.train.latest_checkpoint(str(tmp_path / "stop" / "checkpoints"))
    assert latest is None or int(latest.rsplit("-", 1)[1]) < step
    if latest:
        reader = tf.train.load_checkpoint(latest)
        for k in reader.get_variable_to_shape_map():
            value = reader.get_tensor(k)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), k
    _strict_records(tmp_path / "stop")

    assert skip.returncode == 0, skip.stderr
    records = [r for r in _strict_records(tmp_path / "skip") if r["split"] == "train"]
    assert records[-1]["step"] == 12 and records[-1]["nonfinite_skipped"] > 0
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(str(tmp_path / "skip" / "checkpoints"))
    )
    for k in reader.get_variable_to_shape_map():
        value = reader.get_tensor(k)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), k


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_missing_or_corrupt_checkpoints_and_indivisible_batches_are_named(tmp_path, capsys):
    """evaluate/export of a run without a checkpoint: exit 2; with only an unreadable one:
    exit 1 and a message, no traceback; a global batch the replicas cannot split: exit 2.
    evaluate/export run through the CLI's entry point in this process (local strategy, no
    TensorFlow start-up per call); the mirrored train needs a fresh process for its devices."""
    from dist_share import cli
    from dist_share.run import directory as rundir

    run = tmp_path / "run"
    cfg = load_config(CONFIG, [SMALL[i + 1] for i in range(0, len(SMALL), 2)])
    rundir.prepare(run, cfg, "new")

    def cli_here(*args: str) -> tuple[int, str]:
        code = cli.main(list(args))
        return code, capsys.readouterr().err

    for command in ("evaluate", "export"):
        code, err = cli_here(command, str(run))
        assert code == 2, err
        assert f"has no checkpoint to {command}" in err and "Traceback" not in err
    ckpts = run / "checkpoints"
    ckpts.mkdir()
    (ckpts / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-5"\nall_model_checkpoint_paths: "ckpt-5"\n'
    )
    (ckpts / "ckpt-5.index").write_bytes(b"\x00garbage" * 10)
    (ckpts / "ckpt-5.data-00000-of-00001").write_bytes(b"\x01" * 100)
    for command in ("evaluate", "export"):
        code, err = cli_here(command, str(run))
        assert code == 1, err
        assert "no readable checkpoint in" in err and "Traceback" not in err, err
        assert "checkpoint.resume: false" in err

    cmd = [EXE, "train", CONFIG, "--run-dir", str(tmp_path / "odd"), *SMALL, "--steps", "2",
           "--strategy", "mirrored", "--set", "strategy.num_cpu_devices=2",
           "--set", "training.batch_size=15"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert out.returncode == 2, out.stderr
    assert "training.batch_size" in out.stderr and "multiple of the 2 replicas" in out.stderr
    assert not (tmp_path / "odd").exists()
