"""Training jobs with injected faults, shared by tests/integration/test_reliability_jobs.py and
benchmarks/fault_times.py: ``dist-share launch`` in the background, its ranks found through their
heartbeat files, every descendant process tracked so that nothing outlives a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil

from dist_share.launch.hosts import free_port
from dist_share.train.guards import watchdog
from tests.helpers.paths import CONFIGS, EXE
from tests.helpers.processes import dist_share_launch, worker_env

CONFIG = str(CONFIGS / "siamese_digits.yaml")
TIMEOUT = 420
# Small and deterministic: a resumed run must equal an uninterrupted one.
SMALL = [
    "--set", "data.train_examples=512",
    "--set", "data.eval_examples=64",
    "--set", "training.batch_size=16",
    "--set", "training.log_every=1",
    "--set", "training.eval_every=0",
    "--set", "training.deterministic=true",
    "--set", "logging.progress_bar=false",
    "--set", "logging.tensorboard=false",
    "--set", "model.tower.block={type: mlp, units: [32]}",
    "--set", "model.tower.fold=false",
]  # fmt: skip
STRATEGY = {"horovodrun": "horovod", "mpirun": "horovod", "multiworker": "multiworker"}


def env() -> dict[str, str]:
    env = worker_env()
    env.pop("MAX_RESTARTS", None)
    return env


class Job:
    """``dist-share launch`` in the background: output in files, every descendant tracked."""

    def __init__(self, launcher: str, run_dir: Path, train_args: list[str], launch_args=()):
        self.run_dir = run_dir
        self.log = run_dir.parent / f"{run_dir.name}.{launcher}.log"
        if launcher == "horovodrun" or launcher == "mpirun":
            extra = ["--network-interface", "lo"]
        else:
            extra = ["--base-port", str(free_port(count=2))]
        train = [EXE, "train", CONFIG, "--strategy", STRATEGY[launcher], "--run-dir", str(run_dir)]
        self.argv = dist_share_launch(launcher, [*train, *SMALL, *train_args], *extra, *launch_args)
        self._out = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, stdout=self._out, stderr=subprocess.STDOUT, env=env(),
            start_new_session=True, cwd=run_dir.parent,
        )  # fmt: skip
        self.started = time.monotonic()
        self.seen: set[int] = set()
        self.survivors: list[int] | None = None

    def track(self) -> None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.add(p.pid)
        except psutil.NoSuchProcess:
            pass

    def steps(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                with_step = json.loads(line)
                if with_step.get("split") == "train":
                    out.append(with_step["step"])
        return out

    def wait_for_step(self, step: int, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while True:
            self.track()
            done = self.steps()
            if done and done[-1] >= step:
                return done[-1]
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended ({self.proc.returncode}) early:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no step {step} after {timeout} s:\n{self.output()}")
            time.sleep(0.1)

    def rank_pid(self, rank: int) -> int:
        path = self.run_dir / watchdog.HEARTBEAT_DIR / f"rank-{rank}.json"
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} wrote no heartbeat:\n{self.output()}")
            time.sleep(0.1)
        return json.loads(path.read_text())["pid"]

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            while self.proc.poll() is None:
                self.track()
                time.sleep(0.1)
                if time.monotonic() - self.started > timeout:
                    raise TimeoutError(f"job still running after {timeout} s:\n{self.output()}")
            self.record_survivors()
            return self.proc.returncode
        finally:
            self.close()

    def record_survivors(self, grace: float = 10.0) -> list[int]:
        """Once the launcher has exited: the tracked processes still alive after ``grace`` s
        (what `leftovers` reports; `close` kills them afterwards, so it must come first)."""
        deadline = time.monotonic() + grace
        while True:
            self.survivors = self._alive()
            if not self.survivors or time.monotonic() > deadline:
                return self.survivors
            time.sleep(0.1)

    def close(self) -> None:
        """Kill whatever is left (SIGCONT first: a stopped process ignores the rest)."""
        self.track()
        for pid in [*self.seen, self.proc.pid]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        if not self._out.closed:
            self._out.close()

    def leftovers(self) -> list[int]:
        """Processes of the job that outlived its launcher (see `record_survivors`)."""
        if self.survivors is None:
            raise AssertionError("record_survivors() was not called when the launcher exited")
        return self.survivors

    def _alive(self) -> list[int]:
        alive = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text()[-8000:]


def checkpoint_values(run_dir: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert path, f"no checkpoint in {run_dir}"
    reader = tf.train.load_checkpoint(path)
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if "save_counter" not in k and k != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }
