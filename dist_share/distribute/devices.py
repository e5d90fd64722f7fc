"""Which GPUs each process takes: one decision for every strategy and launcher, made before TensorFlow starts its devices."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dist_share.distribute.cluster import expand_tasks_per_node
from dist_share.errors import ConfigError

log = logging.getLogger(__name__)

# Where each launcher says which of a node's processes this one is (index, count).
_LOCAL_RANK_VARIABLES = (
    ("HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),  # horovodrun
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),  # Open MPI's mpirun
    ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),  # srun with --ntasks-per-node
)


@dataclasses.dataclass(frozen=True)
class NodeSlot:
    """This process among the job's processes on its node: the ``index``-th of ``count``."""

    index: int = 0
    count: int = 1


def _same_host_slot(tf_config: Mapping[str, Any]) -> NodeSlot | None:
    """From TF_CONFIG: this worker's place among the workers whose address has its host."""
    task = tf_config.get("task") or {}
    workers = (tf_config.get("cluster") or {}).get(task.get("type", "worker")) or []
    index = task.get("index")
    if not isinstance(index, int) or not 0 <= index < len(workers):
        return None
    hosts = [str(address).rsplit(":", 1)[0] for address in workers]
    mine = [i for i, host in enumerate(hosts) if host == hosts[index]]
    return NodeSlot(mine.index(index), len(mine))


def node_slot(env: Mapping[str, str]) -> NodeSlot:
    """This process's place on its node, from the launcher's variables (horovodrun, mpirun,
    Slurm), else from TF_CONFIG's same-host workers; one process alone otherwise.

    Slurm's uneven allocations (``SLURM_STEP_TASKS_PER_NODE`` such as ``2(x3),1``) have no
    ``SLURM_NTASKS_PER_NODE``; there the count is this node's entry of the step's list.
    """
    for rank_key, size_key in _LOCAL_RANK_VARIABLES:
        if rank_key in env and size_key in env:
            return NodeSlot(int(env[rank_key]), int(env[size_key]))
    if "SLURM_LOCALID" in env and "SLURM_STEP_TASKS_PER_NODE" in env and "SLURM_NODEID" in env:
        counts = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        node = int(env["SLURM_NODEID"])
        if 0 <= node < len(counts):
            return NodeSlot(int(env["SLURM_LOCALID"]), counts[node])
    if env.get("TF_CONFIG"):
        try:
            slot = _same_host_slot(json.loads(env["TF_CONFIG"]))
        except (ValueError, AttributeError):
            slot = None
        if slot is not None:
            return slot
    return NodeSlot()


def gpus_for(
    strategy: str, gpus: Sequence[Any], slot: NodeSlot, allow_shared: bool = False
) -> list[Any]:
    """The GPUs one process of ``strategy`` takes, of the node's ``gpus``.

    local and mirrored: every GPU of the machine. horovod: one GPU, by node rank. multiworker:
    an equal, contiguous share of the node's GPUs. More processes on a node than GPUs is an
    error naming both counts, unless ``allow_shared`` (then processes share GPUs round-robin).

    Raises:
        ConfigError: at ``strategy.allow_shared_gpus``, with the counts.
    """
    if not gpus or strategy in ("local", "mirrored"):
        return list(gpus)
    if slot.count > len(gpus):
        if not allow_shared:
            raise ConfigError(
                "strategy.allow_shared_gpus",
                f"{slot.count} processes on this node but {len(gpus)} GPU(s): each process "
                "would not get a GPU of its own; start fewer processes per node, or set "
                "strategy.allow_shared_gpus: true to share them",
            )
        return [gpus[slot.index % len(gpus)]]
    if strategy == "horovod":
        return [gpus[slot.index]]
    share = len(gpus) // slot.count
    return list(gpus[slot.index * share : (slot.index + 1) * share])


def place(
    config: Any,
    strategy: str,
    slot: NodeSlot,
    memory_growth: bool = True,
    allow_shared: bool = False,
    num_cpu_devices: int | None = None,
) -> list[Any]:
    """Make this process see only its GPUs (`gpus_for`), with memory growth unless turned off.

    ``config`` is ``tf.config`` (tests pass a recording fake). Call before TensorFlow starts its
    devices. Returns the GPUs taken (none on a machine without GPUs, where nothing is changed).
    """
    gpus = config.list_physical_devices("GPU")
    if not gpus:
        return []
    if num_cpu_devices:
        log.warning(
            "strategy.num_cpu_devices=%d on a machine with %d GPU(s): the replicas are logical "
            "CPUs, the GPUs stay idle (it is meant for tests without GPUs)",
            num_cpu_devices,
            len(gpus),
        )
    chosen = gpus_for(strategy, gpus, slot, allow_shared)
    config.set_visible_devices(chosen, "GPU")
    if memory_growth:
        # Without it TensorFlow takes nearly all of each GPU's memory at start, so processes
        # sharing a node (or a GPU) run out.
        for gpu in chosen:
            config.experimental.set_memory_growth(gpu, True)
    return chosen


def prefetch_device(enabled: bool, gpus: Sequence[Any]) -> str | None:
    """The device a one-replica process copies its batches to ahead of the step: its first
    GPU (after `place`, the only ones it sees), or None on CPUs or when turned off."""
    return gpus[0].name if enabled and gpus else None
