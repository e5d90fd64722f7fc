"""Command lines that start a distributed job: horovodrun, mpirun, or one process per worker.

The launchers want the same facts in different spellings (``-H node1:4,node2:4``, a ``TF_CONFIG``
per worker); they are written once here, for ``dist-share launch`` and the ``launch/`` scripts.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dist_share.errors import ConfigError
from dist_share.launch.hosts import Host, check_np, is_local

LAUNCHERS = ("horovodrun", "mpirun", "multiworker")
# Environment every MPI rank needs to see (mpirun only forwards what it is told to): these, and
# every variable with one of the prefixes (NCCL's and Horovod's settings), when set.
MPI_FORWARD_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "NCCL_DEBUG",
    "TF_CPP_MIN_LOG_LEVEL",
    "CUDA_VISIBLE_DEVICES",
)
MPI_FORWARD_PREFIXES = ("NCCL_", "HOROVOD_")


@dataclass(frozen=True)
class ElasticLaunch:
    """horovodrun's elastic flags (train with ``strategy.horovod.elastic: true``).

    Attributes:
        min_np: fewest workers the job trains with (below it, it waits for hosts).
        max_np: most workers it grows to.
        host_discovery_script: prints the available ``host:slots`` lines; run every second.
        blacklist_cooldown_range: (min, max) seconds a host whose worker failed stays out;
            None: for good (Horovod's default).
    """

    min_np: int | None = None
    max_np: int | None = None
    host_discovery_script: str | None = None
    blacklist_cooldown_range: tuple[int, int] | None = None

    def check(self) -> None:
        if self.min_np is not None and self.min_np < 1:
            raise ConfigError("--min-np", f"must be at least 1, got {self.min_np}")
        if self.min_np is not None and self.max_np is not None and self.max_np < self.min_np:
            raise ConfigError("--max-np", f"{self.max_np} is below --min-np {self.min_np}")
        if self.host_discovery_script and not os.access(self.host_discovery_script, os.X_OK):
            raise ConfigError(
                "--host-discovery-script",
                f"{self.host_discovery_script} is not an executable file",
            )

    def arguments(self) -> list[str]:
        argv: list[str] = []
        if self.min_np is not None:
            argv += ["--min-np", str(self.min_np)]
        if self.max_np is not None:
            argv += ["--max-np", str(self.max_np)]
        if self.host_discovery_script:
            argv += ["--host-discovery-script", self.host_discovery_script]
        if self.blacklist_cooldown_range:
            low, high = self.blacklist_cooldown_range
            argv += ["--blacklist-cooldown-range", str(low), str(high)]
        return argv


def horovodrun_command(
    hosts: Sequence[Host],
    command: Sequence[str],
    num_proc: int | None = None,
    transport: str = "gloo",
    network_interface: str | None = None,
    ssh_port: int | None = None,
    hostfile: str | None = None,
    elastic: ElasticLaunch | None = None,
) -> list[str]:
    """``horovodrun -np N -H h1:s1,h2:s2 --gloo|--mpi [--network-interface IF] COMMAND``.

    With ``elastic``: ``--min-np``/``--max-np`` and, if given, ``--host-discovery-script``
    (then no ``-H``: the script names the hosts, and ``-np`` is the number to start with,
    default ``--min-np``). Horovod runs elastic jobs over Gloo only.
    """
    if elastic is not None:
        if transport != "gloo":
            raise ConfigError("--transport", "elastic horovodrun jobs run over Gloo only")
        elastic.check()
    if elastic is not None and elastic.host_discovery_script:
        n = num_proc or elastic.min_np or 1
        argv = ["horovodrun", "-np", str(n)]
    else:
        n = check_np(hosts, num_proc)
        argv = ["horovodrun", "-np", str(n)]
        argv += ["--hostfile", hostfile] if hostfile else ["-H", ",".join(map(str, hosts))]
    argv.append("--gloo" if transport == "gloo" else "--mpi")
    if elastic is not None:
        argv += elastic.arguments()
    if network_interface:
        argv += ["--network-interface", network_interface]
    if ssh_port:
        argv += ["--ssh-port", str(ssh_port)]
    return argv + list(command)


def mpirun_command(
    hosts: Sequence[Host],
    command: Sequence[str],
    num_proc: int | None = None,
    network_interface: str | None = None,
    allow_run_as_root: bool | None = None,
    forward_env: Sequence[str] = MPI_FORWARD_ENV,
    env: Mapping[str, str] | None = None,
    yield_when_idle: bool = True,
) -> list[str]:
    """Open MPI's ``mpirun`` with the flags the Horovod docs recommend.

    ``-bind-to none -map-by slot``: Horovod processes use many threads, binding them to one core
    starves them. ``-mca pml ob1 -mca btl ^openib``: avoid the openib transport that hangs with
    fork()ing data loaders. Of ``forward_env`` only the variables set in ``env`` (default: this
    process's environment) are forwarded, as Open MPI warns about the others; so is every
    ``NCCL_*`` and ``HOROVOD_*`` variable set there, sorted by name.
    ``-mca mpi_yield_when_idle 1`` (``yield_when_idle``): a waiting rank yields its core.
    """
    env = os.environ if env is None else env
    n = check_np(hosts, num_proc)
    if allow_run_as_root is None:
        allow_run_as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    argv = [
        "mpirun",
        "-np",
        str(n),
        "-H",
        ",".join(map(str, hosts)),
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
    ]
    if allow_run_as_root:
        argv.append("--allow-run-as-root")
    if yield_when_idle:
        # A rank waiting in a collective busy-polls its core; when ranks share cores (a small
        # node, or other jobs) that core is the one its peer needs (docs/PERFORMANCE.md,
        # launchers). Costs nothing otherwise.
        argv += ["-mca", "mpi_yield_when_idle", "1"]
    if network_interface:
        argv += [
            "-mca",
            "btl_tcp_if_include",
            network_interface,
            "-mca",
            "oob_tcp_if_include",
            network_interface,
            "-x",
            f"NCCL_SOCKET_IFNAME={network_interface}",
            "-x",
            f"HOROVOD_GLOO_IFACE={network_interface}",
        ]
    given = {"NCCL_SOCKET_IFNAME", "HOROVOD_GLOO_IFACE"} if network_interface else set()
    prefixed = sorted(k for k in env if k.startswith(MPI_FORWARD_PREFIXES))
    for name in [*forward_env, *(k for k in prefixed if k not in forward_env)]:
        if name in env and name not in given:
            argv += ["-x", name]
    return argv + list(command)


@dataclass(frozen=True)
class WorkerLaunch:
    host: str
    index: int
    tf_config: str
    argv: list[str]


def tf_config_dict(workers: Sequence[str], index: int) -> dict:
    """TF_CONFIG of worker ``index`` in a cluster of ``host:port`` workers."""
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def tf_config(workers: Sequence[str], index: int) -> str:
    return json.dumps(tf_config_dict(workers, index))


def multiworker_commands(
    hosts: Sequence[Host],
    command: Sequence[str],
    base_port: int = 23456,
    workdir: str | None = None,
) -> list[WorkerLaunch]:
    """One MultiWorkerMirrored worker per slot, each with its TF_CONFIG.

    A slot is a worker *process*: on GPU nodes give each host one slot (a worker uses every
    GPU it sees). Workers on the same host get consecutive ports from ``base_port``; remote
    workers are started through ssh in ``workdir`` (default: this directory).
    """
    addresses = [f"{h.name}:{base_port + i}" for h in hosts for i in range(h.slots)]
    names = [h.name for h in hosts for _ in range(h.slots)]
    workdir = workdir or os.getcwd()
    out = []
    for index, host in enumerate(names):
        cfg = tf_config(addresses, index)
        if is_local(host):
            argv = list(command)
        else:
            remote = f"cd {shlex.quote(workdir)} && TF_CONFIG={shlex.quote(cfg)} exec {shlex.join(command)}"
            argv = ["ssh", host, remote]
        out.append(WorkerLaunch(host, index, cfg, argv))
    return out


def format_worker(w: WorkerLaunch) -> str:
    if w.argv and w.argv[0] == "ssh":
        return shlex.join(w.argv)
    return f"TF_CONFIG={shlex.quote(w.tf_config)} {shlex.join(w.argv)}"
