"""Each process's GPUs under every strategy and launcher, with ``tf.config`` replaced by a fake
that has GPUs and records what the placement asked of it (no GPU on these machines)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from dist_share.distribute.devices import NodeSlot, node_slot, place, prefetch_device
from dist_share.errors import ConfigError


class RecordingConfig:
    """``tf.config`` as `devices.place` uses it, on a machine with ``n`` GPUs."""

    def __init__(self, n: int) -> None:
        self.gpus = [f"/physical_device:GPU:{i}" for i in range(n)]
        self.visible: list[str] | None = None
        self.growth: list[str] = []
        self.experimental = self

    def list_physical_devices(self, kind: str) -> list[str]:
        return list(self.gpus) if kind == "GPU" else ["/physical_device:CPU:0"]

    def set_visible_devices(self, devices: list[str], kind: str) -> None:
        assert kind == "GPU" and self.visible is None, "set once, before the devices start"
        self.visible = list(devices)

    def set_memory_growth(self, device: str, enable: bool) -> None:
        assert enable and device in self.gpus
        self.growth.append(device)


def _gpu(*indices: int) -> list[str]:
    return [f"/physical_device:GPU:{i}" for i in indices]


@pytest.mark.parametrize(
    ("env", "slot"),
    [
        ({"HOROVOD_LOCAL_RANK": "3", "HOROVOD_LOCAL_SIZE": "4"}, NodeSlot(3, 4)),  # horovodrun
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, NodeSlot(1, 2)),
        ({"SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4"}, NodeSlot(2, 4)),
        # Slurm, uneven: 2 tasks on each of nodes 0-2, 1 on node 3.
        ({"SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
         NodeSlot(1, 2)),
        ({"SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
         NodeSlot(0, 1)),
        ({}, NodeSlot(0, 1)),  # a process on its own
    ],
)  # fmt: skip
def test_the_launchers_say_which_process_of_the_node_this_is(env: dict, slot: NodeSlot) -> None:
    assert node_slot(env) == slot


def test_tf_config_workers_on_the_same_host_share_its_gpus() -> None:
    cluster = {"worker": ["node-a:2222", "node-b:2222", "node-a:2223", "node-a:2224"]}

    def slot(index: int) -> NodeSlot:
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        return node_slot({"TF_CONFIG": json.dumps(tf_config)})

    assert [slot(i) for i in range(4)] == [NodeSlot(0, 3), NodeSlot(0, 1), NodeSlot(1, 3),
                                           NodeSlot(2, 3)]  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "slot", "expected"),
    [
        ("horovod", NodeSlot(2, 4), _gpu(2)),  # one GPU per rank, by node rank
        ("multiworker", NodeSlot(1, 2), _gpu(2, 3)),  # an equal share of the node's GPUs
        ("mirrored", NodeSlot(), _gpu(0, 1, 2, 3)),  # every GPU of the machine
        ("local", NodeSlot(), _gpu(0, 1, 2, 3)),
    ],
)
def test_each_strategy_takes_its_gpus_with_memory_growth(
    strategy: str, slot: NodeSlot, expected: list[str]
) -> None:
    config = RecordingConfig(4)
    assert place(config, strategy, slot) == expected
    assert config.visible == expected and config.growth == expected


def test_more_processes_than_gpus_is_an_error_naming_the_counts_unless_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        place(RecordingConfig(2), "horovod", NodeSlot(2, 3))
    assert info.value.path == "strategy.allow_shared_gpus"
    assert "3 processes on this node but 2 GPU(s)" in str(info.value)
    config = RecordingConfig(2)
    assert place(config, "horovod", NodeSlot(2, 3), allow_shared=True) == _gpu(0)


def test_memory_growth_can_be_turned_off_and_a_cpu_machine_is_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = RecordingConfig(2)
    place(config, "horovod", NodeSlot(1, 2), memory_growth=False)
    assert config.visible == _gpu(1) and config.growth == []
    cpu_only: Any = RecordingConfig(0)
    assert place(cpu_only, "horovod", NodeSlot(1, 2)) == []
    assert cpu_only.visible is None
    with caplog.at_level(logging.WARNING):
        place(RecordingConfig(2), "mirrored", NodeSlot(), num_cpu_devices=2)
    assert "num_cpu_devices=2 on a machine with 2 GPU(s)" in caplog.text


def test_batches_go_to_the_processs_first_gpu_unless_turned_off_or_on_cpus() -> None:
    class Device:  # tf.config.LogicalDevice's one field used
        def __init__(self, name: str) -> None:
            self.name = name

    gpus = [Device("/device:GPU:0"), Device("/device:GPU:1")]
    assert prefetch_device(True, gpus) == "/device:GPU:0"
    assert prefetch_device(False, gpus) is None
    assert prefetch_device(True, []) is None
