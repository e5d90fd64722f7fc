"""Writing checkpoints: a save that fails cleanly and removes what an interrupted one left."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import tensorflow as tf

from dist_share.errors import CheckpointWriteError, reason_of


def remove_partial_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Delete what an interrupted ``CheckpointManager.save`` leaves: ``ckpt-N_temp*/`` shard
    directories and ``.tmp`` index files. Returns the names removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if "_temp" in p.name or ".tmp" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p.name)
    return removed


def save_checkpoint(manager: tf.train.CheckpointManager, step: int) -> str:
    """``manager.save(step)`` that fails cleanly: on an I/O error (full disk, read-only or
    vanished directory) the partial files are removed and `CheckpointWriteError` says which
    checkpoint is still the newest complete one, instead of TensorFlow's traceback.

    Safe because CheckpointManager writes shards under temporary names and rewrites its index
    (``checkpoint``) last: until then the previous checkpoint is the one a resume reads.
    """
    try:
        return manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
        directory = Path(manager.directory)
        remove_partial_checkpoints(directory)
        reason = reason_of(e)
        previous = tf.train.latest_checkpoint(str(directory))
        kept = (
            f"the previous checkpoint {Path(previous).name} is intact; rerun to resume from it"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {directory}: {reason}. "
            f"Partial files removed; {kept}."
        ) from None
