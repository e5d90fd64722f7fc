"""The run directory: what a run needs to be resumed, evaluated and exported later.

Layout::

    RUN_DIR/config.yaml     the resolved config (every default filled in)
    RUN_DIR/metrics.jsonl   one JSON object per logged step and per evaluation (the trainer)
    RUN_DIR/checkpoints/    tf.train.CheckpointManager files (the trainer)
    RUN_DIR/tensorboard/    summaries (the trainer)
    RUN_DIR/export/         saved_model/ and model.keras (``dist-share export``)

A run directory belongs to one config. Re-running the same config continues it (the trainer
resumes from its checkpoints); a different config is refused unless ``--overwrite``, because
mixing the checkpoints and metrics of two experiments silently is worse than an error. Keys
that do not change what is being trained are exempt, so that a run can be extended
(``training.steps``) or resumed under another strategy or with other logging.

Files are written to a temporary name and renamed, so a crash never leaves half a config, and
get the permissions ``open()`` would give them (umask), like every other file of the run.

One run directory, one live run: `lock` takes an exclusive ``flock`` on ``RUN_DIR/.lock``. The
kernel drops it when the holder exits however it exits (SIGKILL, OOM, a crash), so a dead run
never leaves the directory stuck; a second ``train`` is refused while the first is alive.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from dist_share.config.loading import apply_overrides, diff, dump, merge
from dist_share.config.schema import Config
from dist_share.errors import ConfigError, RunDirBusy
from dist_share.files import atomic_write_text
from dist_share.run.resolve import validate

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# Bookkeeping of a live run, not results: ignored when deciding whether a directory is empty.
HIDDEN = (LOCK_FILE, ".heartbeats")
# What a run writes; --overwrite removes exactly these and nothing else the user put there.
ARTIFACTS = (CONFIG_FILE, METRICS_FILE, "checkpoints", "tensorboard", "export")
# Keys that may differ when continuing a run: they change how long or where, not what, it trains.
RESUMABLE_KEYS = (
    "training.steps",
    "training.log_every",
    "training.eval_every",
    "training.eval_batches",
    "training.steps_per_loop",
    "training.stall_timeout",
    "training.on_nonfinite",
    "strategy",
    "logging",
    "checkpoint",
)


class RunLock:
    """An exclusive lock on a run directory, held until `release` or the process's exit."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise `RunDirBusy` naming the holder (pid, host, start time)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise unwritable(self.run_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirBusy(
                "--run-dir",
                f"{self.run_dir} is in use by {self._holder()}; "
                "wait for that run to end, stop it, or choose another --run-dir",
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')})"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` for this process (the chief of a job): ``with rundir.lock(d): ...``."""
    return RunLock(run_dir).acquire()


def _has_results(run_dir: Path) -> bool:
    return any(p.name not in HIDDEN for p in run_dir.iterdir())


def read_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """The resolved config saved in a run directory, validated again (the schema may have moved on)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    raw = yaml.safe_load(path.read_text()) or {}
    return validate(apply_overrides(raw, overrides))


def _strip(cfg: Mapping, keys: tuple[str, ...]) -> dict:
    out = merge({}, cfg)
    for dotted in keys:
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return out


def check(run_dir: str | os.PathLike, cfg: Config, overwrite: bool = False) -> str:
    """Decide what to do with ``run_dir`` without touching it: 'new', 'resume' or 'overwrite'.

    Every process of a distributed job calls this, so that all of them refuse together; only
    the chief then calls `prepare`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--run-dir", f"{run_dir} exists and is not a directory")
    if not run_dir.exists() or not _has_results(run_dir):
        return "new"
    if overwrite:
        return "overwrite"
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(
            "--run-dir",
            f"{run_dir} is not empty and holds no {CONFIG_FILE}; "
            "pass --overwrite or choose another --run-dir",
        )
    try:
        saved = read_config(run_dir).to_dict()
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(
            "--run-dir",
            f"{saved_path} holds no config this version can read ({e}); pass --overwrite",
        ) from None
    changes = diff(_strip(saved, RESUMABLE_KEYS), _strip(cfg.to_dict(), RESUMABLE_KEYS))
    if changes:
        shown = "\n  ".join(changes[:10]) + ("\n  ..." if len(changes) > 10 else "")
        raise ConfigError(
            "--run-dir",
            f"{run_dir} holds a run of a different config:\n  {shown}\n"
            "pass --overwrite to replace it, or choose another --run-dir",
        )
    return "resume"


def prepare(run_dir: str | os.PathLike, cfg: Config, mode: str) -> None:
    """Create the run directory (or clear a run being overwritten) and save the resolved config."""
    run_dir = Path(run_dir)
    try:
        if mode == "overwrite":
            for name in ARTIFACTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, dump(cfg))
    except OSError as e:
        raise unwritable(run_dir, e) from None


def unwritable(run_dir: str | os.PathLike, error: OSError) -> ConfigError:
    """The error for a run directory that cannot be created or written (exit 2, nothing lost)."""
    where = f" ({error.filename})" if error.filename else ""
    return ConfigError(
        "--run-dir",
        f"cannot write the run directory {run_dir}: {error.strerror or error}{where}; "
        "choose a writable --run-dir",
    )
