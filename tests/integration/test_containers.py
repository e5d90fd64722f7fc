"""The CPU image and the 2-container Horovod job, built and run for real with podman.

The image is docker/Dockerfile.cpu built once per session (conftest.cpu_image) on a local
Debian bookworm + Python 3.11 base (debootstrap, cached; no registry is reachable here) with the
Horovod wheel that ./bootstrap built. The compose job is docker/docker-compose.yml run by
podman-compose, with only the training options overridden (a compose override file), and must
end with the variables of one local process trained on the same config.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.clusters import podman
from tests.helpers.paths import ROOT
from tests.helpers.runs import checkpoint_variables, max_diff
from tests.integration.conftest import (
    CLUSTER_TRAIN_ARGS,
    CLUSTER_TRAIN_STEPS,
    CONFIG,
    BuiltImage,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(2400)]

TOL = 1e-5


def _run(image: BuiltImage, *cmd: str, timeout: float = 300) -> str:
    return podman.run(["podman", "run", "--rm", image.tag, *cmd], timeout)


def _step_cached(log: str, marker: str) -> bool:
    """Whether the build step whose instruction contains ``marker`` came from the layer cache."""
    steps = re.split(r"^(?=\[\d+/\d+\] STEP |STEP \d+/\d+: )", log, flags=re.M)
    matching = [s for s in steps if s.strip() and marker in s.splitlines()[0]]
    assert matching, f"no build step with {marker!r} in the log:\n{log[-3000:]}"
    return all("--> Using cache" in s for s in matching)


def test_cpu_image_has_the_project_and_horovod_with_gloo_and_mpi(cpu_image: BuiltImage) -> None:
    print(
        f"dist-share:cpu: {cpu_image.size_bytes / 1e6:.0f} MB, built in {cpu_image.seconds:.1f} s"
        f" (base {cpu_image.base_how} in {cpu_image.base_seconds:.1f} s)"
    )
    if (podman.CACHE / "wheels").is_dir():
        # The build either reused bootstrap's wheel or found the whole layer cached.
        log = cpu_image.log
        assert "using cached Horovod wheel" in log or _step_cached(log, "./bootstrap setup"), log
    check = (
        "import horovod.tensorflow as hvd, tensorflow as tf, keras, dist_share;"
        "assert hvd.gloo_built() and hvd.mpi_built();"
        "print(tf.__version__, keras.__version__)"
    )
    versions = _run(cpu_image, "python", "-c", check).split()
    assert versions[-2].startswith("2.21") and versions[-1].startswith("3.")
    # Training in the image is the compose test's job (one TensorFlow start less here).
    # The default command is the CLI's help, through the entrypoint.
    assert "usage: dist-share" in _run(cpu_image)


def test_editing_code_or_docs_rebuilds_only_the_code_layers(cpu_image: BuiltImage) -> None:
    """TensorFlow and Horovod live in a layer that depends only on pyproject.toml and bootstrap."""
    for path in ("dist_share/__init__.py", "README.md"):
        with open(cpu_image.context / path, "a") as f:
            f.write(f"\n# edited by {__name__} at {time.time()}\n")
    log, seconds = cpu_image.build()
    print(f"dist-share:cpu rebuilt after a code edit in {seconds:.1f} s")
    assert _step_cached(log, "./bootstrap setup"), "the set-up layer was rebuilt"
    assert _step_cached(log, "apt-get install")
    assert not _step_cached(log, "COPY dist_share dist_share"), "the code layer was not rebuilt"


def test_compose_job_trains_like_one_local_process(
    cpu_image: BuiltImage, reference_run: Path, tmp_path: Path
) -> None:
    """docker/docker-compose.yml as written (rendezvous + 2 Horovod ranks over Gloo on the
    compose network), training options overridden, run to completion by podman-compose."""
    compose = ROOT / "docker" / "docker-compose.yml"
    services = yaml.safe_load(compose.read_text())["services"]
    override = {"services": {}}
    for name in ("worker0", "worker1"):
        command = services[name]["command"]
        assert command[:3] == ["dist-share", "train", CONFIG]
        override["services"][name] = {"command": [*command, *CLUSTER_TRAIN_ARGS]}
    override_file = tmp_path / "override.yml"
    override_file.write_text(yaml.safe_dump(override))
    project = f"dist-share-test-{int(time.time())}"
    # podman-compose from the venv (the test extra): Debian's 1.0.3 ignores ipv4_address.
    compose_cli = str(Path(sys.executable).parent / "podman-compose")
    base = [compose_cli, "-p", project, "-f", str(compose), "-f", str(override_file)]
    t0 = time.monotonic()
    try:
        # The documented command: every container runs to its end (the rendezvous exits once
        # both ranks reported), and a failing one stops the rest.
        up = subprocess.run(
            [*base, "up", "--no-build", "--abort-on-container-failure"],
            env=podman.podman_env(),
            cwd=ROOT / "docker",
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.monotonic() - t0
        output = up.stdout + up.stderr
        print(f"compose job: {seconds:.1f} s (podman-compose up to exit)")
        assert up.returncode == 0, output[-6000:]
        assert "all 2 ranks have exited; job exit code 0" in output, output[-6000:]
        listing = podman.run(
            [
                "podman",
                "ps",
                "-a",
                "--filter",
                f"label=io.podman.compose.project={project}",
                "--format",
                "{{.Names}} {{.ExitCode}}",
            ],
            60,
        )
        exits = dict(re.findall(r"^(\S+) (-?\d+)$", listing, flags=re.M))
        # Each of the three ended by itself: none was stopped (143) or killed (137).
        assert sorted(exits.values()) == ["0", "0", "0"], listing
        volume = f"{project}_runs"
        mount = podman.run(
            ["podman", "volume", "inspect", "--format", "{{.Mountpoint}}", volume], 60
        ).strip()
        run_dir = Path(mount) / "compose-horovod"
        records = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(records) >= CLUSTER_TRAIN_STEPS
        step, variables = checkpoint_variables(run_dir)
        ref_step, ref = checkpoint_variables(reference_run)
        diff = max_diff(variables, ref)
        print(f"compose job: max |variable - local| = {diff:.2e}")
        assert step == ref_step == CLUSTER_TRAIN_STEPS
        assert diff < TOL
    finally:
        subprocess.run(
            [*base, "down", "-v"],
            env=podman.podman_env(),
            cwd=ROOT / "docker",
            capture_output=True,
            timeout=300,
        )
