"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd as child processes.

Everything lives in one directory (``slurm.conf``, its own munge key and socket, state, spool,
logs) and on free ports, so the cluster touches no system configuration (``/etc/slurm``,
``/etc/munge``, ``/run/munge``), can run beside another test session's cluster, and is gone
after :meth:`SlurmCluster.stop`. Clients find it through ``SLURM_CONF`` (:meth:`env`).

Needs Debian's ``slurm-wlm`` and ``munge`` (``./bootstrap setup`` installs them) and root, as
``slurmd`` must start jobs as the submitting user. The node is this host under its own name with
all its CPUs, no accounting, ``proctrack/linuxproc`` (no cgroups needed) and ``cons_tres``.

This module does not import dist_share: it is test infrastructure, usable on its own::

    with SlurmCluster(tmp_dir) as cluster:
        job = cluster.submit(["launch/slurm_horovod.sbatch"], cwd=repo, sbatch_args=["-n2"])
        state = cluster.wait(job, timeout=300)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# Job states after which nothing of the job runs any more (scontrol's JobState).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class SlurmError(RuntimeError):
    """The cluster did not come up, a command failed or a job did not finish in time."""


def missing_tools() -> list[str]:
    """The Slurm/munge programs this module needs that are not on PATH (or in /usr/sbin)."""
    tools = [*DAEMONS, "sbatch", "scontrol", "scancel", "sinfo", "srun"]
    return [t for t in tools if _which(t) is None]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class JobState:
    """What ``scontrol show job`` says about a job (only the fields the tests need)."""

    job_id: str
    state: str  # e.g. RUNNING, COMPLETED, FAILED, CANCELLED
    exit_code: int  # the batch script's exit code (ExitCode=code:signal)
    signal: int
    fields: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class SlurmCluster:
    """One node (this host) with ``cpus`` CPUs; start() brings it up, stop() ends everything.

    Args:
        root: an empty directory for the configuration, state, spool and logs.
        cpus: CPUs of the node (default: all of this machine's).
        kill_wait: seconds between the SIGTERM of a cancelled job and its SIGKILL (Slurm's
            KillWait): the time a job has to save a checkpoint when it is cancelled.
    """

    def __init__(self, root: Path, cpus: int | None = None, kill_wait: int = 60) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.startup_seconds: float | None = None
        # Job ids unique across this machine's test clusters: Slurm's PMIx plugin names
        # directories after them, and a killed step can leave one behind.
        self.first_job_id = 1000 + (os.getpid() * 1000 + int(time.time())) % 10_000_000
        self._procs: dict[str, subprocess.Popen] = {}

    # -- life cycle -----------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, srun, scontrol) to use this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start the daemons and wait until the node is idle.

        Raises:
            SlurmError: a tool is missing, not running as root, or the node did not become
                idle in ``timeout`` seconds (the daemons' logs are in the message).
        """
        missing = missing_tools()
        if missing:
            raise SlurmError(
                f"Slurm tools missing: {', '.join(missing)}; run ./bootstrap setup "
                "(it installs Debian's slurm-wlm and munge)"
            )
        if os.geteuid() != 0:
            raise SlurmError("a test Slurm cluster needs root (slurmd starts jobs as their user)")
        t0 = time.monotonic()
        for sub in ("munge", "state", "spool", "log", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged checks that its socket's directory is reachable by everyone and the key private.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        self._wait_for(lambda: socket_path.exists(), 10, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "the Slurm node did not become idle")
        self.startup_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, wait for it to end, then stop the daemons. Leaves nothing running."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", f"--user={os.getuid()}"], check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._run(["squeue", "-h"], check=False).strip():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout and proc.stdout.close()
        # Job processes and slurmstepd detach from slurmd; find any left by the marker they carry.
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """Processes still running with this cluster's SLURM_CONF in their environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(ProcessLookupError, FileNotFoundError, PermissionError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
        return pids

    # -- jobs -----------------------------------------------------------------------------------
    def submit(
        self,
        script: list[str],
        cwd: Path,
        sbatch_args: list[str] = (),
        env: dict[str, str] | None = None,
    ) -> str:
        """``sbatch --parsable [sbatch_args] script...`` from ``cwd``; returns the job id.

        ``env`` is added to this cluster's client environment; sbatch passes it all to the job.
        """
        out = self._run(["sbatch", "--parsable", *sbatch_args, *script], cwd=cwd, env=env)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> JobState:
        """The job's current state (Slurm keeps finished jobs for MinJobAge = 300 s)."""
        text = self._run(["scontrol", "show", "job", "-o", job_id])
        fields = dict(re.findall(r"(\w+)=(\S*)", text))
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return JobState(job_id, fields["JobState"], int(code), int(sig or 0), fields)

    def wait_until(self, job_id: str, states: set[str], timeout: float) -> JobState:
        """Poll the job until its state is in ``states`` (or final); raises after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states or job.finished:
                return job
            if time.monotonic() > deadline:
                self._run(["scancel", job_id], check=False)
                raise SlurmError(f"job {job_id} still {job.state} after {timeout:.0f} s; cancelled")
            time.sleep(0.5)

    def wait(self, job_id: str, timeout: float) -> JobState:
        """Wait for the job to finish; returns its final state (raises after ``timeout``)."""
        return self.wait_until(job_id, FINAL_STATES, timeout)

    def scancel(self, job_id: str, *args: str) -> None:
        self._run(["scancel", *args, job_id])

    # -- internals ------------------------------------------------------------------------------
    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        return f"""# Written by tests/clusters/slurm.py: a one-node test cluster, removed after the tests.
ClusterName=distsharetest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={r / "state"}
TmpFS={r / "tmp"}
FirstJobId={self.first_job_id}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
KillWait={self.kill_wait}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def _node_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}\n{self.logs()}")
        out = self._run(["sinfo", "-h", "-o", "%T"], check=False)
        return out.strip() == "idle"

    def logs(self) -> str:
        """The tail of every daemon's log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise SlurmError(f"{what} in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def _run(
        self,
        cmd: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        check: bool = True,
    ) -> str:
        out = subprocess.run(
            cmd,
            cwd=cwd,
            env={**self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited with {out.returncode}: {out.stderr.strip()}")
        return out.stdout
