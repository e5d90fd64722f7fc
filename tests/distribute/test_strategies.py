"""Strategy selection, TF_CONFIG discovery from launchers, and the lazy Horovod import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_share.distribute.cluster import discover_tf_config, expand_nodelist, tf_config_from_slurm
from dist_share.errors import ConfigError
from dist_share.run.resolve import validate
from tests.helpers import processes
from tests.helpers.paths import ROOT, WORKERS

DISCOVER = [sys.executable, str(WORKERS / "train_discover.py")]


def test_import_leaves_horovod_out_and_multiworker_needs_a_launcher() -> None:
    """One fresh interpreter (TF start-up is the cost): importing the package, the strategies
    and the trainer must not load Horovod, and `multiworker` with no TF_CONFIG, MPI, Slurm or
    horovodrun variables is a ConfigError naming strategy.name (still without Horovod)."""
    code = (
        "import sys, dist_share, dist_share.distribute.strategies, dist_share.train.trainer\n"
        "import dist_share.distribute.gradients, dist_share.run.session\n"
        "print('HVD', sorted(m for m in sys.modules if m.split('.')[0] == 'horovod'))\n"
        "from dist_share.config.schema import StrategyConfig\n"
        "from dist_share.errors import ConfigError\n"
        "try:\n    dist_share.distribute.strategies.get_strategy(StrategyConfig(name='multiworker'))\n"
        "except ConfigError as e:\n    print('PATH', e.path)\n"
        "print('HVD', sorted(m for m in sys.modules if m.split('.')[0] == 'horovod'))\n"
    )
    prefixes = ("TF_CONFIG", "OMPI_", "PMI", "SLURM_", "HOROVOD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith(("HVD", "PATH"))]
    assert lines == ["HVD []", "PATH strategy.name", "HVD []"], out.stderr[-3000:]


def test_expand_nodelist_without_scontrol() -> None:
    hosts = expand_nodelist("node[01-03,07],gpu5,a[8-10]", use_scontrol=False)
    assert hosts == ["node01", "node02", "node03", "node07", "gpu5", "a8", "a9", "a10"]
    # Asked to use scontrol: missing, or installed without a reachable controller (it then
    # exits 1), the built-in parser answers; with a controller, scontrol answers the same.
    assert expand_nodelist("node[01-03,07],gpu5,a[8-10]", use_scontrol=True) == hosts


def test_tf_config_from_slurm_places_tasks_blockwise() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    cfg = tf_config_from_slurm(env, base_port=30000)
    assert cfg["cluster"]["worker"] == ["n1:30000", "n1:30001", "n2:30000", "n2:30001"]
    assert cfg["task"] == {"type": "worker", "index": 3}
    assert discover_tf_config({}) is None


def _slurm_workers(**env: str) -> list[str]:
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "7", "SLURM_STEP_NODELIST": "node[2,10,11]"}
    return tf_config_from_slurm({**base, **env}, base_port=30000)["cluster"]["worker"]


def test_tf_config_from_slurm_uneven_and_cyclic_placements() -> None:
    # srun -n 7 on 3 nodes with 3, 3 and 1 tasks: Slurm's rank order is the nodelist's
    # (node2 before node10), which TensorFlow's SlurmClusterResolver sorts as strings.
    block = _slurm_workers(SLURM_STEP_TASKS_PER_NODE="3(x2),1")
    assert block == [
        "node2:30000", "node2:30001", "node2:30002",
        "node10:30000", "node10:30001", "node10:30002",
        "node11:30000",
    ]  # fmt: skip
    # --distribution=cyclic deals one task per node in turn, passing over the full node.
    cyclic = _slurm_workers(SLURM_STEP_TASKS_PER_NODE="3(x2),1", SLURM_DISTRIBUTION="cyclic")
    assert cyclic == [
        "node2:30000", "node10:30000", "node11:30000",
        "node2:30001", "node10:30001",
        "node2:30002", "node10:30002",
    ]  # fmt: skip
    plane = _slurm_workers(SLURM_STEP_TASKS_PER_NODE="3(x2),1", SLURM_DISTRIBUTION="plane=2:block")
    assert plane[:4] == ["node2:30000", "node2:30001", "node10:30000", "node10:30001"]
    # Each worker a port per node, every host:port once.
    for workers in (block, cyclic, plane):
        assert sorted(workers) == sorted(block)
    # In a batch script (no step variables): the job's counts.
    batch = tf_config_from_slurm(
        {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "a,b",
         "SLURM_TASKS_PER_NODE": "2,1", "SLURMD_NODENAME": "b"},
        base_port=30000,
    )  # fmt: skip
    assert batch["cluster"]["worker"] == ["a:30000", "a:30001", "b:30000"]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SLURM_STEP_TASKS_PER_NODE": "3,3"}, "'3,3' on 3 node(s) do not add up to 7 tasks"),
        ({"SLURM_DISTRIBUTION": "arbitrary"}, "SLURM_DISTRIBUTION='arbitrary' is not block"),
        (
            {"SLURM_STEP_TASKS_PER_NODE": "3(x2),1", "SLURMD_NODENAME": "node10"},
            "puts task 0 on node2, but it runs on node10",
        ),
    ],
)
def test_tf_config_from_slurm_refuses_what_it_cannot_place(env: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as e:
        _slurm_workers(**env)
    assert e.value.path == "strategy.name"


@pytest.mark.parametrize(
    ("cfg", "path"),
    [
        ({"name": "tpu"}, "strategy.name"),
        ({"name": "mirrored", "num_cpu_devices": 0}, "strategy.num_cpu_devices"),
    ],
)
def test_bad_strategy_config(cfg: dict, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate({"model": {"family": "siamese"}, "strategy": cfg})
    assert e.value.path == path


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_multiworker_finds_its_cluster_from_the_launcher(launcher: str, tmp_path: Path) -> None:
    out = str(tmp_path / "d")
    if launcher == "mpirun":
        cmd = processes.local_mpirun_command(2, [*DISCOVER, out])
    else:
        cmd = processes.local_horovodrun_command(2, [*DISCOVER, out])
    processes.run_job(cmd, 180, cwd=ROOT).check()
    results = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world_size"] == 2
        assert res["total"] == 3.0  # 1 + 2: the collective really spanned both processes
        assert res["tf_config"]["cluster"] == results[0]["tf_config"]["cluster"]


def _worker_result(script: str) -> dict:
    """Run a one-process worker of tests/workers (2 logical CPU devices inside); its last
    output line, JSON."""
    job = processes.run_job([sys.executable, str(WORKERS / script)], 240, cwd=ROOT).check()
    return json.loads(job.output.strip().splitlines()[-1])


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_mirrored_sums_with_each_cross_device_op() -> None:
    result = _worker_result("cross_device_ops.py")
    for ops, got in result["sums"].items():
        assert got["all_reduce"] == [3.0, 3.0, 3.0], ops
    assert result["sums"]["hierarchical_copy"]["class"] == "HierarchicalCopyAllReduce"
    assert result["sums"]["reduction_to_one_device"]["class"] == "ReductionToOneDevice"
    path, message = result["nccl"]
    assert path == "strategy.cross_device_ops" and "this process has none" in message


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_xla_leaves_a_pass_with_tf_distribute_synchronisation_uncompiled() -> None:
    """Keras's synchronized batch normalisation inside a replica pass, 2 Mirrored replicas."""
    result = _worker_result("xla_merge_call.py")
    assert result["try"]["compiled"] is False
    assert result["try"]["values"] == result["plain"]
    assert result["try"]["lines"] == [
        "XLA left off: the pass synchronises the replicas through tf.distribute (merge_call)"
    ]
    path, message = result["on"]
    assert path == "training.jit_compile" and "(merge_call)" in message
