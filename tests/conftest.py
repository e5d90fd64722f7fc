"""Session fixtures shared by the tests that run real clusters (tests/test_slurm.py,
tests/test_containers.py): one Slurm cluster, one CPU image, one reference training run.

Each is expensive (a cluster's daemons, an image build, a TensorFlow start), so each is made
once per test session and torn down at its end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dist_share.processes import run_job

sys.path.insert(0, str(Path(__file__).parent / "workers"))

from clusters.slurm import SlurmCluster  # noqa: E402

ROOT = Path(__file__).parents[1]
DIST_SHARE = str(Path(sys.executable).parent / "dist-share")
CONFIG = "configs/siamese_digits.yaml"
# The default config, short and exactly reproducible across launchers: deterministic ops, SGD,
# no batch norm (its batch statistics are per replica by design, so N replicas of batch B/N
# normalise differently from one replica of batch B). Every cluster job trains with these
# options and must end with the variables of the local run below.
CLUSTER_TRAIN_ARGS = [
    *("--set", "training.steps=6"),
    *("--set", "training.batch_size=16"),
    *("--set", "training.log_every=1"),
    *("--set", "training.eval_every=0"),
    *("--set", "training.deterministic=true"),
    *("--set", "data.train_examples=256"),
    *("--set", "data.eval_examples=64"),
    *("--set", "model.tower.block.norm=none"),
    *("--set", "optimizer.name=sgd"),
    *("--set", "optimizer.learning_rate=0.05"),
    *("--set", "checkpoint.every=3"),
    *("--set", "logging.progress_bar=false"),
]
CLUSTER_TRAIN_STEPS = 6


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster (this host, all CPUs), up for the whole session."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of CONFIG + CLUSTER_TRAIN_ARGS trained by one local process."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.monotonic()
    cmd = [DIST_SHARE, "train", CONFIG, "--strategy", "local", "--run-dir", str(run_dir)]
    run_job([*cmd, *CLUSTER_TRAIN_ARGS], timeout=300, cwd=ROOT).check()
    print(f"reference local run: {time.monotonic() - t0:.1f} s")
    return run_dir
