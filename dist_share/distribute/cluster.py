"""The cluster a multi-worker job runs in: its TF_CONFIG, discovered from an MPI, Slurm or
horovodrun launch."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping

from dist_share.errors import ConfigError
from dist_share.launch.commands import tf_config_dict
from dist_share.launch.containers import kv_get, kv_put
from dist_share.launch.hosts import LOCAL_NAMES, free_port


def discover_tf_config(env: Mapping[str, str]) -> dict | None:
    """TF_CONFIG from an MPI, Slurm or horovodrun launch, in that order; None if none applies."""
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _tf_config_from_mpi()
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return tf_config_from_slurm(env)
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return _tf_config_from_horovodrun(env)
    return None


def _tf_config_from_mpi() -> dict:
    """Every rank picks a free port and the ranks allgather host:port over MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    workers = comm.allgather(f"{socket.gethostname()}:{free_port()}")
    return tf_config_dict(workers, comm.Get_rank())


def expand_nodelist(nodelist: str, use_scontrol: bool | None = None) -> list[str]:
    """Expand a Slurm nodelist (``node[01-03,07],gpu5``).

    Slurm's own ``scontrol show hostnames`` knows every syntax, but it needs a reachable
    controller; where it is missing or fails (a login node, a container without the Slurm
    config) the built-in parser handles the usual ``prefix[ranges]`` forms.
    """
    if use_scontrol is None:
        use_scontrol = shutil.which("scontrol") is not None
    if use_scontrol:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            if out.stdout.split():
                return out.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def tf_config_from_slurm(env: Mapping[str, str], base_port: int | None = None) -> dict:
    """Tasks are placed block-wise (Slurm's default): task i runs on node i // tasks_per_node."""
    rank, ntasks = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    if not nodes:
        raise ConfigError("strategy.name", "multiworker under Slurm: SLURM_JOB_NODELIST is empty")
    per_node = -(-ntasks // len(nodes))
    port = base_port or int(env.get("DIST_SHARE_BASE_PORT", "23456"))
    workers = [f"{nodes[i // per_node]}:{port + i % per_node}" for i in range(ntasks)]
    return tf_config_dict(workers, rank)


def _tf_config_from_horovodrun(env: Mapping[str, str]) -> dict:
    """horovodrun --gloo runs an HTTP key-value store (its rendezvous); exchange host:port there."""
    rank, size = int(env["HOROVOD_RANK"]), int(env["HOROVOD_SIZE"])
    base = f"http://{env['HOROVOD_GLOO_RENDEZVOUS_ADDR']}:{env['HOROVOD_GLOO_RENDEZVOUS_PORT']}"
    host = env.get("HOROVOD_HOSTNAME", socket.gethostname())
    host = "127.0.0.1" if host in LOCAL_NAMES else host
    kv_put(f"{base}/dist_share_tf_config/{rank}", f"{host}:{free_port()}", timeout=30)
    workers = [kv_get(f"{base}/dist_share_tf_config/{i}") for i in range(size)]
    return tf_config_dict(workers, rank)
