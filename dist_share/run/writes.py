"""Writes of a command's output that fail in one line: the path, the reason, and what is kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from dist_share.errors import OutputWriteError, reason_of


def write_or_explain(what: str, path: Path, kept: str, write: Callable[[], None]) -> None:
    """Run ``write``; a full disk or unwritable directory becomes one line naming ``path`` and
    what is kept (the writes are atomic, so nothing partial is left)."""
    try:
        write()
    except (OSError, tf.errors.OpError) as e:
        raise OutputWriteError(
            f"could not write {what} to {path}: {reason_of(e)}. Nothing partial is left; {kept}."
        ) from None
