"""Command lines that start a distributed job: horovodrun, mpirun, or N multi-worker processes.

The launchers want the same facts in different spellings (``-H node1:4,node2:4`` for both
horovodrun and Open MPI, a ``TF_CONFIG`` per process for MultiWorkerMirroredStrategy), and the
flags that make Horovod work over MPI are easy to forget. This module writes them once; the
``dist-share launch`` command prints them (``--dry-run``) or runs them, and the scripts under
``launch/`` show the same lines for batch systems.

Nothing here imports TensorFlow or Horovod.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_share.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ConfigError,
)

LAUNCHERS = ("horovodrun", "mpirun", "multiworker")
LOCAL_NAMES = ("localhost", "127.0.0.1")
# Environment every MPI rank needs to see (mpirun only forwards what it is told to).
MPI_FORWARD_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "NCCL_DEBUG", "TF_CPP_MIN_LOG_LEVEL")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int

    def __str__(self) -> str:
        return f"{self.name}:{self.slots}"


def parse_hosts(text: str, key: str = "--hosts") -> list[Host]:
    """``node1:4,node2:4`` (a missing ``:N`` means one slot) -> [Host('node1', 4), ...]."""
    hosts = []
    for item in (p.strip() for p in text.split(",")):
        name, _, slots = item.partition(":")
        if not name or re.search(r"\s", name):
            raise ConfigError(
                key, f"bad host entry {item!r} in {text!r}; expected HOST[:SLOTS],..."
            )
        try:
            n = int(slots) if slots else 1
        except ValueError:
            n = 0
        if n <= 0:
            raise ConfigError(
                key, f"bad slot count in {item!r}; expected a positive integer, e.g. {name}:4"
            )
        hosts.append(Host(name, n))
    names = [h.name for h in hosts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(key, f"host {dup[0]!r} is listed more than once in {text!r}")
    return hosts


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """An Open MPI / Horovod host file: ``node1 slots=4`` (or ``node1:4``) per line, # comments."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError("--hostfile", f"cannot read {path}: {e.strerror or e}") from None
    entries = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)(\s+.*)?", line)
        entries.append(f"{m.group(1)}:{m.group(2)}" if m else line)
    if not entries:
        raise ConfigError("--hostfile", f"{path} lists no hosts")
    return parse_hosts(",".join(entries), "--hostfile")


def total_slots(hosts: Sequence[Host]) -> int:
    return sum(h.slots for h in hosts)


def _check_np(hosts: Sequence[Host], num_proc: int | None) -> int:
    slots = total_slots(hosts)
    n = slots if num_proc is None else num_proc
    if n <= 0 or n > slots:
        raise ConfigError(
            "-np",
            f"asked for {n} processes but the hosts {','.join(map(str, hosts))} have {slots} slots",
        )
    return n


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
        n = _check_np(hosts, num_proc)
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
    process's environment) are forwarded, as Open MPI warns about the others.
    ``-mca mpi_yield_when_idle 1`` (``yield_when_idle``): a waiting rank yields its core.
    """
    env = os.environ if env is None else env
    n = _check_np(hosts, num_proc)
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
        # node, or other jobs) that core is the one its peer needs: measured 1.5-2.2x slower
        # without this on 2 cores (docs/PERFORMANCE.md, launchers). Costs nothing otherwise.
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
    for name in forward_env:
        if name in env:
            argv += ["-x", name]
    return argv + list(command)


@dataclass(frozen=True)
class WorkerLaunch:
    host: str
    index: int
    tf_config: str
    argv: list[str]


def is_local(host: str) -> bool:
    return host in LOCAL_NAMES or host == socket.gethostname()


def tf_config_dict(workers: Sequence[str], index: int) -> dict:
    """TF_CONFIG of worker ``index`` in a cluster of ``host:port`` workers."""
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def tf_config(workers: Sequence[str], index: int) -> str:
    return json.dumps(tf_config_dict(workers, index))


def free_port(host: str = "", count: int = 1) -> int:
    """A TCP port free now on ``host`` ("" = every interface, for workers other hosts reach).

    With ``count`` > 1, the first of ``count`` consecutive free ports (a multiworker
    ``--base-port``: the workers on one host take consecutive ports, and the port after a free
    one may be another connection's).
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        ports = range(base + 1, base + count)
        if base + count - 1 <= 65535 and not any(_bind_error(host, p) for p in ports):
            return base
    raise OSError(f"no {count} consecutive free ports found on {host or 'this host'}")


def _bind_error(host: str, port: int) -> OSError | None:
    """Why ``port`` cannot be bound now, or None (TIME_WAIT does not count as in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


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


# What a relaunch can fix: a lost peer, a crash, a killed process. Not a bad config (2), a
# diverged run (4: it would diverge again), a preemption (75: the machine is going away) or Ctrl-C.
RESTARTABLE = frozenset({EXIT_FAILURE, EXIT_PEER_LOST})
# Seconds a process group gets between SIGTERM (rank saves and exits) and SIGKILL.
TERMINATE_GRACE = 30.0


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` for -9, ``exited with code 3`` otherwise."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def job_exit_code(code: int) -> int:
    """A launcher's or worker's return code as one of ours: a death by signal is a lost peer (3),
    shells' 128+N likewise; documented codes pass through."""
    if code < 0 or (128 < code < 160 and code != EXIT_INTERRUPTED):
        return EXIT_PEER_LOST
    if code in (
        0,
        EXIT_FAILURE,
        EXIT_USAGE,
        EXIT_PEER_LOST,
        EXIT_NONFINITE,
        EXIT_PREEMPTED,
        EXIT_INTERRUPTED,
    ):
        return code
    return EXIT_FAILURE


def _say(text: str) -> None:
    print(f"dist-share launch: {text}", file=sys.stderr, flush=True)


def kill_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End the process group led by ``proc``: SIGCONT (a frozen process cannot act on SIGTERM),
    SIGTERM (a rank saves at preemption and exits), SIGKILL after ``grace`` seconds if any
    process of the group is still there. A launcher's workers die with it."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.wait()
            return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _ForwardSignals:
    """While active, SIGTERM/SIGINT/SIGHUP sent to this launcher go to the job's process groups
    (so preemption reaches every rank and they can save) instead of killing only the launcher."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        _say(f"got {signal.Signals(signum).name}; passing it on to the job")
        for pid in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signum)

    def __enter__(self) -> _ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# horovodrun (Gloo) exits 1 whatever its ranks did and names the first failure in its error.
_HOROVODRUN_FIRST_FAILURE = re.compile(r"^Exit code: (-?\d+)\s*$")


def _echo_and_scan(stream: Any, sink: Any, pattern: re.Pattern, found: list[int]) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        m = pattern.match(line)
        if m and not found:
            found.append(int(m.group(1)))
    stream.close()


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run a launcher in its own process group and return a documented exit code.

    SIGTERM / Ctrl-C sent to us reach every process it started (they save and exit 75 / 130).
    horovodrun's stderr is passed through and read for the exit code of the first rank that
    failed, which horovodrun itself turns into 1.
    """
    scan = Path(argv[0]).name == "horovodrun"
    first_failure: list[int] = []
    with _ForwardSignals() as fwd:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            start_new_session=True,
            stderr=subprocess.PIPE if scan else None,
            text=scan,
        )
        fwd.groups.append(proc.pid)
        reader = None
        if scan:
            reader = threading.Thread(
                target=_echo_and_scan,
                args=(proc.stderr, sys.stderr, _HOROVODRUN_FIRST_FAILURE, first_failure),
                daemon=True,
            )
            reader.start()
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                kill_process_group(proc, TERMINATE_GRACE)
            if reader is not None:
                reader.join(timeout=10)
    if code != 0 and first_failure:
        _say(
            f"{argv[0]} {describe_exit(code)}; the first rank to fail {describe_exit(first_failure[0])}"
        )
        return job_exit_code(first_failure[0])
    if code not in (0, EXIT_INTERRUPTED, EXIT_PREEMPTED):
        _say(f"{argv[0]} {describe_exit(code)}")
    return job_exit_code(code)


def check_local_ports(workers: Sequence[WorkerLaunch]) -> None:
    """Refuse (`ConfigError`, exit 2) when a local worker's TF_CONFIG port is taken: the worker
    would otherwise die in TensorFlow's server start-up with a gRPC traceback."""
    for w in workers:
        if w.argv and w.argv[0] == "ssh":
            continue
        address = json.loads(w.tf_config)["cluster"]["worker"][w.index]
        port = int(address.rsplit(":", 1)[1])
        error = _bind_error("", port)
        if error is not None:
            raise ConfigError(
                "--base-port",
                f"port {port} of worker {w.index} ({address}) is in use on this host "
                f"({error.strerror}); choose another --base-port",
            )


def run_multiworker(workers: Sequence[WorkerLaunch], grace: float = TERMINATE_GRACE) -> int:
    """Start every worker (the collective needs all of them) and watch them.

    When one ends with an error or a signal, it is named (index, host, pid, how it ended), the
    others get SIGTERM (SIGKILL after ``grace`` s) and the launch returns its documented exit
    code: a worker killed by a signal -> 3 (`EXIT_PEER_LOST`), otherwise the worker's own code
    (2, 3, 4, 75, 130; anything else -> 1). Returns 0 when every worker succeeded.
    """
    check_local_ports(workers)
    procs: list[subprocess.Popen] = []
    with _ForwardSignals() as fwd:
        try:
            for w in workers:
                env = dict(os.environ)
                if w.argv[0] != "ssh":
                    env["TF_CONFIG"] = w.tf_config
                p = subprocess.Popen(w.argv, env=env, start_new_session=True)
                procs.append(p)
                fwd.groups.append(p.pid)
            while True:
                codes = [p.poll() for p in procs]
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # A preempted job: every worker saves/exits on its own; wait for them.
                    if fwd.received is not None and all(c is not None for c in codes):
                        return job_exit_code(max(c for _, c in failed))
                    if fwd.received is not None:
                        time.sleep(0.2)
                        continue
                    index, code = failed[0]
                    w, p = workers[index], procs[index]
                    alive = sum(c is None for c in codes)
                    _say(
                        f"worker {index} ({w.host}, pid {p.pid}) {describe_exit(code)}; "
                        f"stopping the other {alive} worker(s)"
                    )
                    return job_exit_code(code)
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    kill_process_group(p, grace)


def run_with_restarts(
    start: Callable[[], int],
    max_restarts: int,
    backoff: float = 5.0,
    max_backoff: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Call ``start()`` (one launch of the whole job) until it succeeds, like torchrun's agent.

    A launch that ends with a restartable code (1, 3: `RESTARTABLE`) is started again after
    ``backoff * 2**i`` seconds (capped at ``max_backoff``), at most ``max_restarts`` times; the
    trainer resumes from the newest checkpoint. Bad config (2), non-finite values (4),
    preemption (75) and Ctrl-C (130) are returned at once. Each restart is logged.
    """
    attempt = 0
    while True:
        code = start()
        if code == 0 or code not in RESTARTABLE:
            return code
        if attempt >= max_restarts:
            if max_restarts:
                _say(f"giving up after {max_restarts} restart(s); last exit code {code}")
            return code
        attempt += 1
        delay = min(max_backoff, backoff * 2 ** (attempt - 1))
        _say(
            f"job failed with exit code {code}; restart {attempt}/{max_restarts} in {delay:g} s "
            "(resumes from the last checkpoint)"
        )
        sleep(delay)


# -- TF_CONFIG discovery for MultiWorkerMirrored under another launcher -------------------------
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
    _kv_put(f"{base}/dist_share_tf_config/{rank}", f"{host}:{free_port()}", timeout=30)
    workers = [_kv_get(f"{base}/dist_share_tf_config/{i}") for i in range(size)]
    return tf_config_dict(workers, rank)


def _kv_put(url: str, value: str, timeout: float) -> None:
    req = urllib.request.Request(url, data=value.encode(), method="PUT")
    urllib.request.urlopen(req, timeout=timeout).close()


def _kv_get(url: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- Horovod over Gloo without horovodrun (containers that cannot ssh to each other) -----------
def gloo_slot_env(
    hosts: Sequence[Host], rank: int, rendezvous_addr: str, rendezvous_port: int, iface: str
) -> dict[str, str]:
    """The environment horovodrun --gloo would give ``rank``: its place in the host plan plus
    where the rendezvous server is. Ranks fill hosts in order, like horovodrun's plan."""
    size = total_slots(hosts)
    if not 0 <= rank < size:
        raise ConfigError(
            "--rank",
            f"rank {rank} is not in range(0, {size}) for hosts {','.join(map(str, hosts))}",
        )
    owners = [(i, local) for i, h in enumerate(hosts) for local in range(h.slots)]
    host_index, local_rank = owners[rank]
    host = hosts[host_index]
    cross = [i for i, h in enumerate(hosts) if h.slots > local_rank]
    return {
        "HOROVOD_HOSTNAME": host.name,
        "HOROVOD_RANK": str(rank),
        "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(local_rank),
        "HOROVOD_LOCAL_SIZE": str(host.slots),
        "HOROVOD_CROSS_RANK": str(cross.index(host_index)),
        "HOROVOD_CROSS_SIZE": str(len(cross)),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous_addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous_port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": iface,
        "NCCL_SOCKET_IFNAME": iface,
    }


# Where each rank's exit code goes. An ad-hoc scope: Horovod's own scopes (global, local_*,
# cross_*) are cleared by the server when their ranks finish the Gloo rendezvous.
EXIT_SCOPE = "dist_share_exit"


def serve_rendezvous(
    hosts: Sequence[Host], port: int, ready: Callable[[int], None] | None = None
) -> int:
    """Run the HTTP rendezvous that horovodrun --gloo would start, on a fixed port, for as long
    as the job runs; return the job's exit code.

    Uses Horovod's own server (pinned Horovod 0.28.1), so the workers see exactly what
    horovodrun gives them; only the ssh-based process start is replaced. What horovodrun also
    does, and a compose file cannot, is wait for every rank and exit with the job's status: here
    each rank reports its exit code (`run_rank`), and the server stops once all have reported.
    Its own exit code is then 0 if every rank succeeded, else the first failing rank's. So the
    rendezvous lives as long as the job, and `compose up --abort-on-container-failure` needs no
    container to be stopped when all goes well (``--abort-on-container-exit`` stops rank 0 as
    soon as any other rank exits first). SIGTERM/SIGINT stop it with 128 + the signal.
    """
    from horovod.runner.common.util.hosts import get_host_assignments
    from horovod.runner.common.util.hosts import parse_hosts as hvd_hosts
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    size = total_slots(hosts)
    plan = get_host_assignments(hvd_hosts(",".join(map(str, hosts))), size)
    server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    server.init(plan)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        stop.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, name="rendezvous", daemon=True)
    thread.start()
    if ready is not None:
        ready(server.server_address[1])
    codes: dict[int, int] = {}
    try:
        while len(codes) < size and not stop.wait(0.2):
            with server.cache_lock:
                reported = dict(server.cache.get(EXIT_SCOPE, {}))
            for rank, value in sorted(reported.items()):
                if int(rank) not in codes:
                    codes[int(rank)] = int(value)
                    print(f"rendezvous: rank {rank} exited with code {int(value)}", flush=True)
    finally:
        server.shutdown()
        server.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if signals:
        print(f"rendezvous: stopped by {signal.Signals(signals[0]).name}", flush=True)
        return 128 + signals[0]
    failed = [code for _, code in sorted(codes.items()) if code != 0]
    code = failed[0] if failed else 0
    print(f"rendezvous: all {size} ranks have exited; job exit code {code}", flush=True)
    return code


def run_rank(argv: Sequence[str], rendezvous: str, rank: int) -> int:
    """Run one rank's command (`run`: SIGTERM reaches it, so a stopped container still saves),
    then report its exit code to the rendezvous, which exits once every rank has reported."""
    code = run(argv)
    try:
        _kv_put(f"http://{rendezvous}/{EXIT_SCOPE}/{rank}", str(code), timeout=10)
    except OSError as e:
        # The rendezvous is gone (stopped with the job): nobody waits for this report.
        print(
            f"rank {rank}: could not report exit code {code} to {rendezvous}: {e}", file=sys.stderr
        )
    return code


def _rendezvous_address(text: str) -> tuple[str, int]:
    addr, _, port = text.rpartition(":")
    if not addr or not port.isdigit():
        raise ConfigError("--rendezvous", f"got {text!r}, expected ADDR:PORT")
    return addr, int(port)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dist_share.launching",
        description="Horovod/Gloo rendezvous for launches without horovodrun",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "rendezvous",
        help="serve the Gloo rendezvous for HOSTS on PORT until every rank has reported its "
        "exit; exit with the job's code",
    )
    p.add_argument("--hosts", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("gloo-env", help="print 'export K=V' lines for one rank")
    p.add_argument("--hosts", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--rendezvous", required=True, help="ADDR:PORT of the rendezvous server")
    p.add_argument("--iface", default="eth0", help="network interface for Gloo (lo on one machine)")
    p = sub.add_parser(
        "run-rank", help="run COMMAND as RANK, then report its exit code to the rendezvous"
    )
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--rendezvous", required=True, help="ADDR:PORT of the rendezvous server")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run-rank":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise ConfigError("run-rank", "needs a command after --")
            addr, port = _rendezvous_address(args.rendezvous)
            return run_rank(command, f"{addr}:{port}", args.rank)
        hosts = parse_hosts(args.hosts)
        if args.cmd == "rendezvous":
            return serve_rendezvous(
                hosts,
                args.port,
                lambda port: print(f"rendezvous listening on port {port}", flush=True),
            )
        addr, port = _rendezvous_address(args.rendezvous)
        for key, value in gloo_slot_env(hosts, args.rank, addr, port, args.iface).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
