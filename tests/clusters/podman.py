"""Real container images and a real compose job for the tests, with podman.

No image registry is reachable from the test machines, so the base image is made locally:
``debootstrap --variant=minbase bookworm`` from the Debian mirror, with Python 3.11 (the same
Debian and Python as the default ``python:3.11-slim-bookworm`` base), imported with
``podman import``. The root file system is cached as a tarball outside the clone
(``$DIST_SHARE_CACHE/images``, default ``~/.cache/dist_share/images``), so debootstrap runs once per
machine and a fresh clone only imports the tarball (seconds).

podman is configured through its own ``containers.conf`` (``CONTAINERS_CONF``, written by
:func:`podman_env`): runc as the runtime and explicit default ulimits. crun, podman's default,
cannot set the default rlimits nor run on this machine's hybrid cgroup layout.

This module does not import dist_share: it is test infrastructure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("DIST_SHARE_CACHE", Path.home() / ".cache" / "dist_share"))
BASE_IMAGE = "localhost/dist-share-base:bookworm-py3.11"
# The Debian packages that make minbase a Python base like python:3.11-slim-bookworm.
BASE_PACKAGES = ("python3", "python3-venv", "python3-dev", "ca-certificates")
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
CONTAINERS_CONF = """# Written by tests/clusters/podman.py
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""


class PodmanError(RuntimeError):
    """A podman, debootstrap or compose command failed (its output is in the message)."""


def missing_tools() -> list[str]:
    tools = ["podman", "runc", "debootstrap"]
    return [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin"))]


def podman_env(conf_dir: Path | None = None) -> dict[str, str]:
    """The environment for podman and podman-compose: this module's containers.conf."""
    conf_dir = conf_dir or CACHE / "podman"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(cmd: list[str], timeout: float, env: dict | None = None, **kw) -> str:
    """Run a command, return its output (stdout and stderr); raises PodmanError on failure."""
    try:
        out = subprocess.run(
            cmd,
            env=env or podman_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            start_new_session=True,
            **kw,
        )
    except subprocess.TimeoutExpired as e:
        raise PodmanError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from e
    if out.returncode != 0:
        raise PodmanError(f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stdout[-6000:]}")
    return out.stdout


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One builder at a time per machine for a cached artefact (two test sessions may race)."""
    path = CACHE / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag], env=podman_env()).returncode == 0


def ensure_base_image(timeout: float = 900) -> tuple[str, str]:
    """Make :data:`BASE_IMAGE` available; returns (tag, how: present | imported | debootstrapped).

    Order: the image in podman's store; else the cached root file system tarball, imported;
    else debootstrap (network: the Debian mirror), tar it into the cache, import.
    """
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE, "present"
    tarball = CACHE / "images" / "debian-bookworm-minbase-python3.11.tar"
    how = "imported"
    with _cache_lock("base-image"):
        if not tarball.exists():
            how = "debootstrapped"
            tarball.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tarball.parent) as work:
                rootfs = Path(work) / "rootfs"
                run(
                    [
                        shutil.which("debootstrap", path="/usr/sbin:/usr/bin") or "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(BASE_PACKAGES)}",
                        "bookworm",
                        str(rootfs),
                        DEBIAN_MIRROR,
                    ],
                    timeout,
                )
                # apt's downloaded .debs are not part of an image.
                for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                    deb.unlink()
                partial = Path(work) / "rootfs.tar"
                run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], 600)
                partial.rename(tarball)  # complete or absent, never half-written
        if not image_exists(BASE_IMAGE):
            run(
                [
                    "podman",
                    "import",
                    "--change",
                    'CMD ["/bin/bash"]',
                    "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    str(tarball),
                    BASE_IMAGE,
                ],
                600,
            )
    return BASE_IMAGE, how


def build_image(
    repo: Path,
    dockerfile: str,
    tag: str,
    build_args: dict[str, str],
    build_contexts: dict[str, Path] | None = None,
    timeout: float = 1800,
    target: str | None = None,
) -> tuple[str, float]:
    """``podman build`` from the repository root; returns (build log, seconds)."""
    cmd = ["podman", "build", "-f", dockerfile, "-t", tag, "--layers"]
    cmd += ["--ignorefile", f"{dockerfile}.dockerignore"]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    for name, path in (build_contexts or {}).items():
        cmd += ["--build-context", f"{name}={path}"]
    if target:
        cmd += ["--target", target]
    previous = _image_id(tag)
    t0 = time.monotonic()
    log = run([*cmd, "."], timeout, cwd=repo)
    seconds = time.monotonic() - t0
    if previous and previous != _image_id(tag):
        # The image this tag named before; its layers stay cached for the next build.
        subprocess.run(["podman", "rmi", previous], env=podman_env(), capture_output=True)
    return log, seconds


def _image_id(tag: str) -> str | None:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", tag],
        env=podman_env(),
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def image_size_bytes(tag: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", tag], 60).strip())
