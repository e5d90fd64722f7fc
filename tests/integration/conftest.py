"""Session fixtures of the tests that run real clusters (test_slurm.py, test_containers.py):
one Slurm cluster, one CPU image, one reference training run; and a tmpfs for the disk faults.

Each is expensive (a cluster's daemons, an image build, a TensorFlow start), so each is made
once per test session and torn down at its end.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clusters import podman
from tests.clusters.slurm import SlurmCluster
from tests.helpers.paths import EXE, ROOT
from tests.helpers.processes import run_job

CONFIG = "configs/siamese_digits.yaml"
# The default config, short and exactly reproducible across launchers: deterministic ops, SGD,
# no batch norm (its steep first steps at this learning rate would amplify float32's summation
# order; batch norm's exactness across launchers is test_equivalence.py's). Every cluster job
# trains with these options and must end with the variables of the local run below.
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


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (root only: the full-disk and read-only cases need a real
    file system with those properties), unmounted afterwards."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.fail(f"mounting a tmpfs ({options}) needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def _session_dir(prefix: str) -> Iterator[Path]:
    """A directory for the whole session, removed at its end. Not pytest's tmp_path_factory:
    pytest deletes all but the newest 3 base temp directories when a session starts, so another
    session starting on the same machine would delete a running cluster's spool directory."""
    path = Path(tempfile.mkdtemp(prefix=f"dist_share_{prefix}_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster (this host, all CPUs), up for the whole session."""
    with _session_dir("slurm") as root:
        cluster = SlurmCluster(root)
        # The daemons run in their own sessions: a SIGTERM to pytest (CI cancelling the run)
        # must still reach the teardown below, as Ctrl-C does.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def reference_run() -> Iterator[Path]:
    """The run directory of CONFIG + CLUSTER_TRAIN_ARGS trained by one local process."""
    with _session_dir("reference") as root:
        yield _train_reference(root / "run")


def _train_reference(run_dir: Path) -> Path:
    t0 = time.monotonic()
    cmd = [EXE, "train", CONFIG, "--strategy", "local", "--run-dir", str(run_dir)]
    run_job([*cmd, *CLUSTER_TRAIN_ARGS], timeout=300, cwd=ROOT).check()
    print(f"reference local run: {time.monotonic() - t0:.1f} s")
    return run_dir


@dataclass
class BuiltImage:
    """The CPU image built once per session, and what it took."""

    tag: str
    context: Path  # a copy of the repository (tests may edit it and rebuild)
    log: str
    seconds: float
    base_seconds: float
    base_how: str  # present | imported | debootstrapped
    size_bytes: int

    def build(self) -> tuple[str, float]:
        """Build docker/Dockerfile.cpu from ``context`` again, exactly as the first time."""
        return podman.build_image(
            self.context, "docker/Dockerfile.cpu", self.tag, **cpu_build_args()
        )


def cpu_build_args() -> dict:
    """The local Debian base (no registry here), bootstrap's Horovod wheels if built, and the
    host's CA certificates for the downloads."""
    contexts = {}
    if any((podman.CACHE / "wheels").glob("horovod-*/horovod-*.whl")):
        contexts["horovod-wheels"] = podman.CACHE / "wheels"
    # This machine reaches PyPI through a TLS-inspecting proxy its own CA bundle trusts.
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.exists():
        ca_dir = podman.CACHE / "build-ca-certificates"
        ca_dir.mkdir(parents=True, exist_ok=True)
        copy = ca_dir / "host-ca-certificates.crt"
        if not copy.exists() or copy.read_bytes() != host_ca.read_bytes():
            shutil.copyfile(host_ca, copy)
        contexts["build-ca-certificates"] = ca_dir
    return {"build_args": {"BASE_IMAGE": podman.BASE_IMAGE}, "build_contexts": contexts}


@pytest.fixture(scope="session")
def cpu_image() -> Iterator[BuiltImage]:
    with _session_dir("image") as root:
        yield _build_cpu_image(root / "dist_share")


def _build_cpu_image(context: Path) -> BuiltImage:
    """dist-share:cpu built with podman from docker/Dockerfile.cpu (layers cached by podman)."""
    missing = podman.missing_tools()
    if missing:
        pytest.fail(f"container tools missing: {', '.join(missing)}; run ./bootstrap setup")
    t0 = time.monotonic()
    _, how = podman.ensure_base_image()
    base_seconds = time.monotonic() - t0
    shutil.copytree(
        ROOT,
        context,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".*_cache"),
    )
    image = BuiltImage("localhost/dist-share:cpu", context, "", 0.0, base_seconds, how, 0)
    image.log, image.seconds = image.build()
    image.size_bytes = podman.image_size_bytes(image.tag)
    print(
        f"base image {how} in {base_seconds:.1f} s; dist-share:cpu built in {image.seconds:.1f} s,"
        f" {image.size_bytes / 1e6:.0f} MB"
    )
    return image
