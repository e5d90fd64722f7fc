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

Files are written to a temporary name and renamed, so a crash never leaves half a config.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from dist_share import config as config_lib
from dist_share.config import Config
from dist_share.errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# What a run writes; --overwrite removes exactly these and nothing else the user put there.
ARTIFACTS = (CONFIG_FILE, METRICS_FILE, "checkpoints", "tensorboard", "export")
# Keys that may differ when continuing a run: they change how long or where, not what, it trains.
RESUMABLE_KEYS = (
    "training.steps",
    "training.log_every",
    "training.eval_every",
    "training.eval_batches",
    "training.steps_per_loop",
    "strategy",
    "logging",
    "checkpoint",
)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same directory and rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """The resolved config saved in a run directory, validated again (the schema may have moved on)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    raw = yaml.safe_load(path.read_text()) or {}
    return config_lib.validate(config_lib.apply_overrides(raw, overrides))


def _strip(cfg: Mapping, keys: tuple[str, ...]) -> dict:
    out = config_lib.merge({}, cfg)
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
    if not run_dir.exists() or not any(run_dir.iterdir()):
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
    changes = config_lib.diff(_strip(saved, RESUMABLE_KEYS), _strip(cfg.to_dict(), RESUMABLE_KEYS))
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
    if mode == "overwrite":
        for name in ARTIFACTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, config_lib.dump(cfg))
