"""Launch command lines, the launch/ scripts and the Kubernetes manifests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_share.errors import ConfigError
from dist_share.launch.commands import (
    ElasticLaunch,
    format_worker,
    horovodrun_command,
    mpirun_command,
    multiworker_commands,
    tf_config,
)
from dist_share.launch.containers import gloo_slot_env
from dist_share.launch.hosts import Host, free_port, parse_hosts, read_hostfile, total_slots
from tests.helpers.paths import EXE, ROOT
from tests.helpers.processes import dist_share_launch, run_job

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(
    [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), ROOT / "docker" / "entrypoint.sh"]
    + [ROOT / "bootstrap", ROOT / ".ci" / "run"]
)


def _train(strategy: str, run_dir: str) -> list[str]:
    """The training command line the launch scripts run (the default config)."""
    return ["dist-share", "train", "configs/siamese_digits.yaml", "--strategy", strategy,
            "--run-dir", run_dir]  # fmt: skip


TRAIN = _train("horovod", "runs/x")


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "DRY_RUN": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(LAUNCH / name), *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=ROOT,
        timeout=60,
    )


def _cli_dry_run(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [EXE, "launch", "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ if env is None else env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- host lists --------------------------------------------------------------------------------
def test_parse_hosts_and_hostfiles(tmp_path: Path) -> None:
    assert parse_hosts("node1:4,node2:4") == [Host("node1", 4), Host("node2", 4)]
    assert parse_hosts("a, b:2") == [Host("a", 1), Host("b", 2)]
    for bad, word in [
        ("a:0", "slot count"),
        ("a:x", "slot count"),
        ("a:2,a:2", "more than once"),
        ("a,,b", "bad host"),
    ]:
        with pytest.raises(ConfigError, match=word) as info:
            parse_hosts(bad)
        assert info.value.path == "--hosts"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1 slots=4\n\nnode2 slots = 2  # small\nnode3:1\n")
    assert read_hostfile(hostfile) == [
        Host("node1", 4),
        Host("node2", 2),
        Host("node3", 1),
    ]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="lists no hosts"):
        read_hostfile(tmp_path / "empty")


def test_horovodrun_and_mpirun_command_lines() -> None:
    hosts = parse_hosts("node1:4,node2:4")
    assert horovodrun_command(hosts, ["python", "train.py"]) == [
        "horovodrun",
        "-np",
        "8",
        "-H",
        "node1:4,node2:4",
        "--gloo",
        "python",
        "train.py",
    ]
    assert horovodrun_command(
        hosts, ["x"], num_proc=6, transport="mpi", network_interface="ib0", ssh_port=2222
    ) == [
        "horovodrun",
        "-np",
        "6",
        "-H",
        "node1:4,node2:4",
        "--mpi",
        "--network-interface",
        "ib0",
        "--ssh-port",
        "2222",
        "x",
    ]
    elastic = ElasticLaunch(2, 8, "/bin/true", (10, 60))
    assert horovodrun_command(hosts, ["x"], elastic=elastic) == [
        "horovodrun",
        "-np",
        "2",
        "--gloo",
        "--min-np",
        "2",
        "--max-np",
        "8",
        "--host-discovery-script",
        "/bin/true",
        "--blacklist-cooldown-range",
        "10",
        "60",
        "x",
    ]
    # Without a discovery script the hosts are horovodrun's fixed elastic host set.
    assert horovodrun_command(hosts, ["x"], num_proc=4, elastic=ElasticLaunch(min_np=2)) == [
        "horovodrun",
        "-np",
        "4",
        "-H",
        "node1:4,node2:4",
        "--gloo",
        "--min-np",
        "2",
        "x",
    ]
    with pytest.raises(ConfigError, match="Gloo only"):
        horovodrun_command(hosts, ["x"], transport="mpi", elastic=elastic)
    with pytest.raises(ConfigError, match="--max-np"):
        horovodrun_command(hosts, ["x"], elastic=ElasticLaunch(4, 2))
    with pytest.raises(ConfigError, match="not an executable"):
        horovodrun_command(
            hosts, ["x"], elastic=ElasticLaunch(host_discovery_script="/nonexistent")
        )
    argv = mpirun_command(
        hosts,
        ["x"],
        network_interface="eth0",
        allow_run_as_root=False,
        env={"PATH": "/bin", "NCCL_DEBUG": "INFO"},
    )
    assert argv == [
        "mpirun",
        "-np",
        "8",
        "-H",
        "node1:4,node2:4",
        "-bind-to",
        "none",
        "-map-by",
        "slot",
        "-mca",
        "pml",
        "ob1",
        "-mca",
        "btl",
        "^openib",
        "-mca",
        "mpi_yield_when_idle",
        "1",
        "-mca",
        "btl_tcp_if_include",
        "eth0",
        "-mca",
        "oob_tcp_if_include",
        "eth0",
        "-x",
        "NCCL_SOCKET_IFNAME=eth0",
        "-x",
        "HOROVOD_GLOO_IFACE=eth0",
        "-x",
        "PATH",
        "-x",
        "NCCL_DEBUG",
        "x",
    ]
    with pytest.raises(ConfigError, match="asks|asked for 9 processes"):
        mpirun_command(hosts, ["x"], num_proc=9)


def test_local_mpirun_yields_unless_told_not_to() -> None:
    """Only bench_scaling's "mpirun x2" case runs without mpi_yield_when_idle, to measure it."""
    from tests.helpers.processes import local_mpirun_command

    flag = ["-mca", "mpi_yield_when_idle", "1"]

    def has_flag(argv: list[str]) -> bool:
        return any(argv[i : i + 3] == flag for i in range(len(argv)))

    default = local_mpirun_command(2, ["x"])
    assert default[:2] == ["mpirun", "--oversubscribe"] and default[-1] == "x"
    assert has_flag(default)
    without = local_mpirun_command(2, ["x"], yield_when_idle=False)
    assert not has_flag(without) and "mpi_yield_when_idle" not in without
    assert [a for a in default if a not in flag] == [a for a in without if a not in flag]


def test_multiworker_commands_give_each_worker_its_tf_config() -> None:
    workers = multiworker_commands(
        parse_hosts("localhost:2,node2:1"),
        ["dist-share", "train", "c.yaml"],
        base_port=5000,
        workdir="/work dir",
    )
    cluster = ["localhost:5000", "localhost:5001", "node2:5000"]
    for i, w in enumerate(workers):
        assert json.loads(w.tf_config) == {
            "cluster": {"worker": cluster},
            "task": {"type": "worker", "index": i},
        }
    assert workers[0].argv == ["dist-share", "train", "c.yaml"]
    assert workers[2].argv[:2] == ["ssh", "node2"]
    remote = workers[2].argv[2]
    assert remote.startswith("cd '/work dir' && TF_CONFIG=") and remote.endswith(
        "exec dist-share train c.yaml"
    )
    assert shlex.split(format_worker(workers[1]))[0].startswith("TF_CONFIG={")


def test_gloo_slot_env_matches_horovods_own_host_plan() -> None:
    from horovod.runner.common.util.hosts import get_host_assignments
    from horovod.runner.common.util.hosts import parse_hosts as hvd_hosts

    for text in ["w0:1,w1:1", "a:2,b:3", "a:3,b:1,c:2"]:
        hosts = parse_hosts(text)
        plan = get_host_assignments(hvd_hosts(text), total_slots(hosts))
        for slot in plan:
            env = gloo_slot_env(hosts, slot.rank, "10.0.0.1", 29400, "eth0")
            assert (env["HOROVOD_HOSTNAME"], env["HOROVOD_RANK"], env["HOROVOD_SIZE"]) == (
                slot.hostname,
                str(slot.rank),
                str(slot.size),
            )
            assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == (
                str(slot.local_rank),
                str(slot.local_size),
            )
            assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == (
                str(slot.cross_rank),
                str(slot.cross_size),
            )
    with pytest.raises(ConfigError, match="rank 2"):
        gloo_slot_env(parse_hosts("a:1,b:1"), 2, "x", 1, "lo")


# -- the scripts -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n_and_shellcheck(path: Path) -> None:
    assert (
        subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
    )
    out = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", str(path.relative_to(ROOT))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout
    assert os.access(path, os.X_OK), f"{path} is not executable"
    header = path.read_text().splitlines()[1:4]
    assert any(line.startswith("# ") for line in header), (
        "scripts start with a comment saying what they do"
    )


def test_elastic_horovodrun_from_the_cli(tmp_path: Path) -> None:
    discover = tmp_path / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:2\n")
    discover.chmod(0o755)
    train = ["dist-share", "train", "cfg.yaml", "--set", "strategy.horovod.elastic=true"]
    out = _cli_dry_run("-np", "2", "--min-np", "1", "--max-np", "4", "--host-discovery-script",
                       str(discover), "--blacklist-cooldown-range", "5", "30", "--", *train)  # fmt: skip
    assert shlex.split(out) == [
        "horovodrun", "-np", "2", "--gloo", "--min-np", "1", "--max-np", "4",
        "--host-discovery-script", str(discover), "--blacklist-cooldown-range", "5", "30", *train,
    ]  # fmt: skip
    for args, word in [
        (["--launcher", "mpirun", "--min-np", "1"], "need --launcher horovodrun"),
        (["--hosts", "a:2", "--host-discovery-script", str(discover)], "not both"),
        (["--transport", "mpi", "--min-np", "1", "--hosts", "a:1,b:1"], "Gloo only"),
    ]:
        done = subprocess.run([EXE, "launch", "--dry-run", *args, "--", *train],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and word in done.stderr, done.stderr


def test_script_dry_runs_match_the_cli() -> None:
    extra = ["--steps", "3"]
    out = _script(
        "horovod_single_node.sh", "--dry-run", *extra, NP="2", RUN_DIR="runs/x"
    ).stdout.strip()
    assert out == _cli_dry_run("--hosts", "localhost:2", "--", *TRAIN, *extra)
    # The same environment for both, as -x forwards only variables that are set.
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = _script(
        "mpirun.sh", HOSTS="a:2,b:2", IFACE="eth0", RUN_DIR="runs/x", TF_CPP_MIN_LOG_LEVEL="2"
    ).stdout.strip()
    assert out == _cli_dry_run(
        "--launcher",
        "mpirun",
        "--hosts",
        "a:2,b:2",
        "--network-interface",
        "eth0",
        "--",
        *TRAIN,
        env=env,
    )
    hostfile = str(LAUNCH / "hostfile.example")
    out = _script("horovod_multi_node.sh", HOSTFILE=hostfile, RUN_DIR="runs/x").stdout.strip()
    assert out == _cli_dry_run(
        "--hostfile", hostfile, "--network-interface", "eth0", "--ssh-port", "22", "--", *TRAIN
    )
    assert shlex.split(out)[:3] == ["horovodrun", "-np", "8"]  # 4 + 4 slots in the example hostfile


def test_mirrored_and_multiworker_scripts() -> None:
    out = _script("mirrored_single_node.sh", CPU_DEVICES="2").stdout
    assert shlex.split(out) == [
        *_train("mirrored", "runs/siamese_digits-mirrored"),
        *("--set", "strategy.num_cpu_devices=2"),
    ]
    out = _script("multiworker.sh", INDEX="1", WORKERS="n1:7000,n2:7000,n3:7000").stdout
    argv = shlex.split(out)
    assert argv[0] == "env" and argv[1].startswith("TF_CONFIG=")
    assert json.loads(argv[1][len("TF_CONFIG=") :]) == json.loads(
        tf_config(["n1:7000", "n2:7000", "n3:7000"], 1)
    )
    assert argv[2:6] == ["dist-share", "train", "configs/siamese_digits.yaml", "--strategy"]
    bad = _script("multiworker.sh", INDEX="3", WORKERS="n1:1,n2:1")
    assert bad.returncode == 2 and "INDEX 3" in bad.stderr
    assert _script("multiworker.sh").returncode == 2  # INDEX is required


def test_slurm_scripts() -> None:
    for name in ("slurm_horovod.sbatch", "slurm_multiworker.sbatch"):
        text = (LAUNCH / name).read_text()
        assert "#SBATCH --nodes=" in text and "#SBATCH --ntasks-per-node=" in text
    argv = shlex.split(_script("slurm_horovod.sbatch", SLURM_JOB_ID="42").stdout)
    assert argv[:3] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1"]
    assert argv[3:] == _train("horovod", "runs/siamese_digits-slurm-42")
    argv = shlex.split(_script("slurm_horovod.sbatch", LAUNCHER="mpirun", SLURM_NTASKS="8").stdout)
    assert argv[:3] == ["mpirun", "-np", "8"] and "horovod" in argv
    argv = shlex.split(_script("slurm_multiworker.sbatch").stdout)
    assert (
        argv[:2] == ["srun", "--mpi=none"] and argv[argv.index("--strategy") + 1] == "multiworker"
    )
    assert _script("slurm_horovod.sbatch", LAUNCHER="pbs").returncode == 2


# -- real launches (no TensorFlow in the launched processes) ----------------------------------
@pytest.mark.multiprocess
def test_launch_multiworker_runs_every_worker_with_its_tf_config(tmp_path: Path) -> None:
    code = "import os, sys; open(os.path.join(sys.argv[1], os.environ['TF_CONFIG'][-3:-2]), 'w').write(os.environ['TF_CONFIG'])"
    argv = [sys.executable, "-c", code, str(tmp_path)]
    port = str(free_port(count=2))
    run_job(dist_share_launch("multiworker", argv, "--base-port", port), timeout=120).check()
    configs = {p.name: json.loads(p.read_text()) for p in tmp_path.iterdir()}
    assert sorted(configs) == ["0", "1"]
    assert [configs[i]["task"]["index"] for i in ("0", "1")] == [0, 1]
    code = "import os, sys; sys.exit(3 if os.environ['TF_CONFIG'][-3] == '1' else 0)"
    failing = run_job(dist_share_launch("multiworker", [sys.executable, "-c", code]), timeout=120)
    assert failing.returncode == 3


@pytest.mark.multiprocess
def test_launch_mpirun_starts_the_ranks(tmp_path: Path) -> None:
    code = "import os, sys; open(os.path.join(sys.argv[1], os.environ['OMPI_COMM_WORLD_RANK']), 'w').write('')"
    argv = [sys.executable, "-c", code, str(tmp_path)]
    run_job(dist_share_launch("mpirun", argv), timeout=120).check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]


# -- Kubernetes --------------------------------------------------------------------------------
def _manifest(name: str) -> dict:
    return yaml.safe_load((LAUNCH / "k8s" / name).read_text())


def _containers(template: dict) -> list[dict]:
    containers = template["template"]["spec"]["containers"]
    for c in containers:
        assert c["name"] and c["image"], c
    return containers


def test_mpijob_manifest_is_a_consistent_v2beta1_mpijob() -> None:
    job = _manifest("mpijob-horovod.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob")
    assert job["metadata"]["name"].replace("-", "").isalnum() and job["metadata"]["name"].islower()
    spec = job["spec"]
    assert spec["mpiImplementation"] == "OpenMPI"
    launcher, worker = spec["mpiReplicaSpecs"]["Launcher"], spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1
    (lc,) = _containers(launcher)
    (wc,) = _containers(worker)
    cmd = lc["command"]
    assert cmd[0] == "mpirun" and all(isinstance(a, str) for a in cmd)
    assert int(cmd[cmd.index("-np") + 1]) == worker["replicas"] * spec["slotsPerWorker"]
    assert cmd[cmd.index("--strategy") + 1] == "horovod"
    assert wc["command"] == ["/usr/sbin/sshd", "-De"]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == spec["slotsPerWorker"]
    volumes = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    }
    assert claims == {_manifest("pvc-runs.yaml")["metadata"]["name"]}
    # NCCL's shared memory: /dev/shm is an in-memory volume, not the pod's default 64 MB.
    (shm,) = [m["name"] for m in wc["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"


def test_tfjob_manifest_is_a_multiworker_tfjob() -> None:
    job = _manifest("tfjob-multiworker.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2 and worker["restartPolicy"] in (
        "OnFailure",
        "Never",
        "Always",
        "ExitCode",
    )
    (c,) = _containers(worker)
    assert c["name"] == "tensorflow"  # the training operator finds the container by this name
    assert (
        c["command"][:2] == ["dist-share", "train"]
        and c["command"][c["command"].index("--strategy") + 1] == "multiworker"
    )
    pvc = _manifest("pvc-runs.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# -- what GPU jobs need from the launch files -----------------------------------------------------
GPU_ENV = {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "NCCL_IB_DISABLE": "1",
    "NCCL_SOCKET_IFNAME": "ib0",  # given by value with --network-interface: not forwarded twice
    "HOROVOD_CYCLE_TIME": "0.5",
    "HOROVOD_FUSION_THRESHOLD": "67108864",
    "UNRELATED": "x",
}


def test_mpirun_forwards_nccl_horovod_and_cuda_variables() -> None:
    argv = mpirun_command(
        parse_hosts("a:2,b:2"), ["x"], network_interface="eth0", allow_run_as_root=False,
        env={"PATH": "/bin", **GPU_ENV},
    )  # fmt: skip
    forwarded = [argv[i + 1] for i, a in enumerate(argv) if a == "-x" and "=" not in argv[i + 1]]
    assert forwarded == [
        "PATH", "CUDA_VISIBLE_DEVICES", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD",
        "NCCL_IB_DISABLE",
    ]  # fmt: skip
    # The scripts forward the same, in the same order (their dry runs equal the CLI's).
    # (The CLI sets TF_CPP_MIN_LOG_LEVEL for itself, so the script is given it too.)
    env = {"PATH": os.environ["PATH"], "HOME": "/root", "TF_CPP_MIN_LOG_LEVEL": "2", **GPU_ENV}
    out = _script(
        "mpirun.sh", HOSTS="a:2,b:2", IFACE="eth0", RUN_DIR="runs/x", TF_CPP_MIN_LOG_LEVEL="2",
        **GPU_ENV,
    )  # fmt: skip
    assert out.stdout.strip() == _cli_dry_run(
        "--launcher", "mpirun", "--hosts", "a:2,b:2", "--network-interface", "eth0", "--",
        *TRAIN, env=env,
    )  # fmt: skip
    sbatch = shlex.split(
        _script("slurm_horovod.sbatch", LAUNCHER="mpirun", SLURM_NTASKS="4", **GPU_ENV).stdout
    )
    assert [sbatch[i + 1] for i, a in enumerate(sbatch) if a == "-x"][1:] == [
        "CUDA_VISIBLE_DEVICES", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD",
        "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME",
    ]  # fmt: skip


def test_srun_passes_the_jobs_cpus_per_task_on() -> None:
    for name in ("slurm_horovod.sbatch", "slurm_multiworker.sbatch"):
        argv = shlex.split(_script(name, SLURM_CPUS_PER_TASK="8").stdout)
        assert argv[0] == "srun" and "--cpus-per-task=8" in argv, argv
        assert not [a for a in shlex.split(_script(name).stdout) if a.startswith("--cpus")]


def test_the_single_node_script_starts_one_process_per_gpu(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"  # what `nvidia-smi -L` prints on a node with 4 GPUs
    smi.write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA A100 (UUID: x)"; done\n')
    smi.chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    argv = shlex.split(_script("horovod_single_node.sh", PATH=path).stdout)
    assert argv[:5] == ["horovodrun", "-np", "4", "-H", "localhost:4"]
    argv = shlex.split(_script("horovod_single_node.sh").stdout)  # no GPU here: 2
    assert argv[:5] == ["horovodrun", "-np", "2", "-H", "localhost:2"]
