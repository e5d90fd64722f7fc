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


def expand_tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed tasks-per-node list: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        number, _, repeat = part.partition("(x")
        counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def slurm_task_hosts(
    nodes: list[str], counts: list[int], distribution: str
) -> list[tuple[str, int]]:
    """(node, index among that node's tasks) of every task, in rank order.

    ``distribution`` is Slurm's node-level task distribution (SLURM_DISTRIBUTION before any
    ``:``): ``block`` fills each node in nodelist order, ``cyclic`` deals one task to each node
    in turn (passing over full ones), ``plane=N`` deals N at a time.
    """
    left = dict(zip(nodes, counts, strict=True))
    taken = dict.fromkeys(nodes, 0)
    hand = {"block": max(counts, default=1), "cyclic": 1}.get(distribution)
    if hand is None and distribution.startswith("plane="):
        hand = int(distribution.removeprefix("plane="))
    if hand is None:
        raise ConfigError(
            "strategy.name",
            f"multiworker under Slurm: SLURM_DISTRIBUTION={distribution!r} is not block, "
            "cyclic or plane=N; give the workers a TF_CONFIG instead",
        )
    out: list[tuple[str, int]] = []
    while any(left.values()):
        for node in nodes:
            deal = min(hand, left[node])
            out += [(node, taken[node] + i) for i in range(deal)]
            taken[node] += deal
            left[node] -= deal
    return out


def tf_config_from_slurm(env: Mapping[str, str], base_port: int | None = None) -> dict:
    """TF_CONFIG for an srun task: every task's node from the step's nodelist, tasks per node
    (uneven counts like ``2(x3),1`` included) and distribution; ports count up per node.

    Not TensorFlow's SlurmClusterResolver: it sorts node names as strings (``node10`` before
    ``node2``, unlike Slurm's ranks), places tasks block-wise whatever the distribution, and
    needs nvidia-smi or a GPU count to build at all (docs/DISTRIBUTED.md).

    Raises:
        ConfigError: no nodelist, counts that do not add up to the tasks, a distribution
            without a known order, or a node for this task other than the one it runs on.
    """
    rank = int(env["SLURM_PROCID"])
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    nodelist = (
        env.get("SLURM_STEP_NODELIST")
        or env.get("SLURM_JOB_NODELIST")
        or env.get("SLURM_NODELIST", "")
    )
    nodes = expand_nodelist(nodelist)
    if not nodes:
        raise ConfigError("strategy.name", "multiworker under Slurm: SLURM_JOB_NODELIST is empty")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
    else:  # equal shares, the last node taking what is left
        share = -(-ntasks // len(nodes))
        counts = [max(0, min(share, ntasks - i * share)) for i in range(len(nodes))]
    if len(counts) != len(nodes) or sum(counts) != ntasks:
        raise ConfigError(
            "strategy.name",
            f"multiworker under Slurm: tasks per node {per_node!r} on {len(nodes)} node(s) "
            f"do not add up to {ntasks} tasks",
        )
    distribution = env.get("SLURM_DISTRIBUTION", "block").split(":")[0] or "block"
    placed = slurm_task_hosts(nodes, counts, distribution)
    here = env.get("SLURMD_NODENAME")
    if here and placed[rank][0] != here:
        raise ConfigError(
            "strategy.name",
            f"multiworker under Slurm: SLURM_DISTRIBUTION={distribution} puts task {rank} on "
            f"{placed[rank][0]}, but it runs on {here}; give the workers a TF_CONFIG instead",
        )
    port = base_port or int(env.get("DIST_SHARE_BASE_PORT", "23456"))
    workers = [f"{node}:{port + index}" for node, index in placed]
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
