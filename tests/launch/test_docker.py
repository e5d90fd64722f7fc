"""The Docker images, the entrypoint and the compose job, tested without a Docker engine.

What can run here does: hadolint on the Dockerfiles, the compose and entrypoint logic, and the
compose topology itself (a rendezvous and two worker "containers" as local processes, over
loopback instead of the compose network).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_share.launch.hosts import free_port
from tests.helpers.paths import ROOT, WORKERS
from tests.helpers.processes import worker_env

DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HADOLINT = str(Path(sys.executable).parent / "hadolint")


def _entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DIST_SHARE_PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        [str(ENTRYPOINT), *args], capture_output=True, text=True, env=full, timeout=60
    )


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_set_up_like_the_bootstrap(name: str) -> None:
    out = subprocess.run(
        [HADOLINT, str(DOCKER / name)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DOCKER / name).read_text()
    assert "./bootstrap setup" in text
    assert "DIST_SHARE_VENV=" in text and "DIST_SHARE_CACHE=" in text
    assert 'ENTRYPOINT ["dist-share-entrypoint"]' in text
    for src in re.findall(r"^COPY (?!--from=)(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"{name} copies {path}, which does not exist"
    # The same base for both: the tests build them on one local debootstrap image.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, flags=re.M)
    if name == "Dockerfile.gpu":
        assert "DIST_SHARE_TF_EXTRA=gpu" in text
        # Horovod is compiled (with NCCL) in a builder stage; the image gets its venv only.
        assert "FROM ${BASE_IMAGE} AS builder" in text
        assert "COPY --from=builder /opt/venv /opt/venv" in text
        assert "hvd.nccl_built()" in text
        assert "NVIDIA_VISIBLE_DEVICES=all" in text
        assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
        assert "COPY docker/gpu-constraints.txt" in text
    # The base is a build argument; the Horovod wheel and extra CA certificates are optional
    # named build contexts (empty stages unless replaced with --build-context).
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert "FROM scratch AS horovod-wheels" in text and "from=horovod-wheels" in text
    assert (DOCKER / f"{name}.dockerignore").read_text().split()[:2] == [".git", ".venv"]


def test_the_gpu_compose_file_gives_each_worker_its_own_gpu_and_shared_memory() -> None:
    base = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) == set(base)  # every service of the job runs the GPU image
    assert {svc["image"] for svc in gpu.values()} == {"dist-share:gpu"}
    devices = []
    for name in ("worker0", "worker1"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and "count" not in device
        devices += device["device_ids"]
        assert gpu[name]["shm_size"] == "1gb"
    assert devices == ["0", "1"]  # not `gpus: all`, with which both ranks would take GPU 0


def test_compose_file_describes_a_two_rank_job_without_ssh() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"rendezvous", "worker0", "worker1"}
    build = services["worker0"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    rdv = services["rendezvous"]
    assert rdv["environment"]["DIST_SHARE_ROLE"] == "rendezvous"
    rdv_ip = rdv["networks"]["hvd"]["ipv4_address"]
    ranks = []
    for name in ("worker0", "worker1"):
        svc = services[name]
        env = svc["environment"]
        assert env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == rdv_ip
        assert svc["hostname"] == name and "rendezvous" in svc["depends_on"]
        assert svc["command"][:2] == ["dist-share", "train"] and "horovod" in svc["command"]
        # What the entrypoint would export in this container.
        out = _entrypoint(*svc["command"], DRY_RUN="1", **{k: str(v) for k, v in env.items()})
        assert out.returncode == 0, out.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", out.stdout, flags=re.M))
        assert exports["HOROVOD_HOSTNAME"] == name and exports["HOROVOD_SIZE"] == "2"
        rank = exports["HOROVOD_RANK"]
        # The command runs under run-rank, which reports its exit code to the rendezvous.
        assert out.stdout.strip().splitlines()[-1] == (
            f"{sys.executable} -m dist_share.launch run-rank --rank {rank} "
            f"--rendezvous {rdv_ip}:29400 -- " + " ".join(svc["command"])
        )
        ranks.append(rank)
    assert sorted(ranks) == ["0", "1"]
    assert "hvd" in compose["networks"] and "runs" in compose["volumes"]


def test_entrypoint_roles_and_errors() -> None:
    assert _entrypoint(DRY_RUN="1").stdout.strip() == "dist-share --help"
    assert _entrypoint("echo", "hi there").stdout.strip() == "hi there"
    out = _entrypoint(
        DRY_RUN="1",
        DIST_SHARE_ROLE="rendezvous",
        HOROVOD_HOSTS="a:1,b:1",
        HOROVOD_GLOO_RENDEZVOUS_PORT="29400",
    )
    assert (
        out.stdout.strip()
        == f"{sys.executable} -m dist_share.launch rendezvous --hosts a:1,b:1 --port 29400"
    )
    assert _entrypoint(DRY_RUN="1", DIST_SHARE_ROLE="sshd").stdout.strip() == "/usr/sbin/sshd -De"
    missing = _entrypoint("x", DIST_SHARE_ROLE="worker", HOROVOD_HOSTS="a:1")
    assert missing.returncode == 2 and "DIST_SHARE_RANK" in missing.stderr
    bad_rank = _entrypoint(
        "x",
        DIST_SHARE_ROLE="worker",
        HOROVOD_HOSTS="a:1",
        DIST_SHARE_RANK="5",
        HOROVOD_GLOO_RENDEZVOUS_ADDR="127.0.0.1",
        HOROVOD_GLOO_RENDEZVOUS_PORT="1",
    )
    assert bad_rank.returncode == 2 and "rank 5" in bad_rank.stderr
    unknown = _entrypoint(DIST_SHARE_ROLE="chief")
    assert unknown.returncode == 2 and "unknown DIST_SHARE_ROLE" in unknown.stderr


def _launch(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dist_share.launch", *args],
        env=worker_env({}),
        start_new_session=True,
        text=True,
        **popen,
    )


def _wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read ``proc``'s stdout up to a line containing ``text`` (a line written once it is ready)."""
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"process ended before printing {text!r} (exit code {proc.wait()})")


@pytest.mark.timeout(120)
def test_rendezvous_lives_until_every_rank_reported_and_exits_with_the_jobs_code() -> None:
    """What lets `compose up --abort-on-container-failure` end a job without stopping anyone."""
    port = str(free_port())
    rendezvous = _launch(
        "rendezvous", "--hosts", "worker0:1,worker1:1", "--port", port, stdout=subprocess.PIPE
    )
    ranks = []
    try:
        _wait_for_line(rendezvous, "listening")
        for rank, command in ((0, ["true"]), (1, ["sh", "-c", "exit 4"])):
            ranks.append(
                _launch(
                    "run-rank",
                    "--rank",
                    str(rank),
                    "--rendezvous",
                    f"127.0.0.1:{port}",
                    "--",
                    *command,
                )
            )
            assert ranks[-1].wait(timeout=60) == (0, 4)[rank]
            if rank == 0:
                time.sleep(1)  # one report is not the job's end: the rendezvous keeps serving
                assert rendezvous.poll() is None
        out, _ = rendezvous.communicate(timeout=60)
        assert rendezvous.returncode == 4, out
        assert "rank 0 exited with code 0" in out and "rank 1 exited with code 4" in out
        assert "all 2 ranks have exited; job exit code 4" in out
    finally:
        for p in (rendezvous, *ranks):
            _kill(p)


@pytest.mark.timeout(120)
def test_run_rank_passes_sigterm_on_and_a_stopped_rendezvous_exits_143() -> None:
    """`docker stop` sends SIGTERM to the container's first process: run-rank for a worker (the
    command must get it to save and exit 75), the rendezvous server itself."""
    port = str(free_port())
    rendezvous = _launch("rendezvous", "--hosts", "a:2", "--port", port, stdout=subprocess.PIPE)
    worker = None
    try:
        _wait_for_line(rendezvous, "listening")
        trap = (
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        )
        worker = _launch(
            "run-rank",
            "--rank",
            "1",
            "--rendezvous",
            f"127.0.0.1:{port}",
            "--",
            sys.executable,
            "-c",
            trap,
            stdout=subprocess.PIPE,
        )
        _wait_for_line(worker, "ready")
        worker.send_signal(signal.SIGTERM)  # to run-rank alone, as `docker stop` would
        assert worker.wait(timeout=30) == 75
        _wait_for_line(rendezvous, "rank 1 exited with code 75")
        assert rendezvous.poll() is None  # rank 0 has not reported
        rendezvous.send_signal(signal.SIGTERM)
        out, _ = rendezvous.communicate(timeout=30)
        assert rendezvous.returncode == 143 and "stopped by SIGTERM" in out
    finally:
        for p in (rendezvous, worker):
            if p is not None:
                _kill(p)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.multiprocess
def test_compose_topology_runs_two_horovod_ranks_without_horovodrun(tmp_path: Path) -> None:
    """rendezvous + worker0 + worker1 exactly as in docker-compose.yml, as local processes."""
    port = str(free_port())
    common = {
        "HOROVOD_HOSTS": "worker0:1,worker1:1",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1",
        "HOROVOD_GLOO_RENDEZVOUS_PORT": port,
        "HOROVOD_GLOO_IFACE": "lo",
        "DIST_SHARE_PYTHON": sys.executable,
        "RENDEZVOUS_WAIT": "60",
    }
    cmd = [sys.executable, str(WORKERS / "cli_gloo_allreduce.py"), str(tmp_path)]
    procs = []
    try:
        # Workers first: they must wait for the rendezvous to come up, as in compose.
        for rank in (0, 1):
            env = worker_env({**common, "DIST_SHARE_ROLE": "worker", "DIST_SHARE_RANK": str(rank)})
            procs.append(
                subprocess.Popen(
                    [str(ENTRYPOINT), *cmd],
                    env=env,
                    start_new_session=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        time.sleep(1)
        rendezvous = subprocess.Popen(
            [str(ENTRYPOINT)],
            env=worker_env({**common, "DIST_SHARE_ROLE": "rendezvous"}),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(rendezvous)
        for p in procs[:2]:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out[-4000:]
        # Both ranks reported: the rendezvous ends by itself, with the job's code.
        out, _ = rendezvous.communicate(timeout=60)
        assert rendezvous.returncode == 0, out[-4000:]
        assert "all 2 ranks have exited; job exit code 0" in out
    finally:
        for p in procs:
            _kill(p)
    results = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["size"] == 2 and r["summed"] == [3.0] and r["gloo"]
        assert (r["local_rank"], r["cross_rank"]) == (0, r["rank"])
        assert r["hostname"] == f"worker{r['rank']}"
