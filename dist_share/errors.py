"""Errors that name what the user got wrong, so the CLI can print them and exit non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config value is wrong. `path` is the dotted key path, e.g. ``model.tower.sharing``."""

    # Found after training started (a bad record, an elastic job re-formed to a size the batch
    # does not split over): the run directory holds good checkpoints and must be kept.
    found_while_training = False

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DataError(ValueError):
    """Input data does not match what the config or the model expects (stream, shape, dtype)."""

    found_while_training = False  # as ConfigError's


def hint(key: object, known: Iterable[object], what: str = "known keys") -> str:
    """``; did you mean 'x'?`` for a near miss, else ``; known keys: a, b`` (for error messages)."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; {what}: " + ", ".join(known)


# Exit codes of ``dist-share`` (README, docs/RELIABILITY.md). 3 and 75 mean "rerun to resume".
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PEER_LOST = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the checkpoint is saved, rerun the same command
EXIT_INTERRUPTED = 130


class JobError(RuntimeError):
    """A run ended for a reason the user can act on; the CLI prints ``message`` (no traceback)
    and exits with ``exit_code``. What was kept on disk is said in the message."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock (exit 2: choose another --run-dir)."""


class CheckpointWriteError(JobError):
    """A checkpoint could not be written (full disk, read-only or vanished directory)."""


class PeerLost(JobError):
    """Another rank of the job died or stopped answering; this rank aborts (exit 3)."""

    exit_code = EXIT_PEER_LOST


class OutputWriteError(JobError):
    """An export or embedding shard could not be written (full disk, read-only directory)."""


def reason_of(error: BaseException) -> str:
    """The first line of an I/O error's message (TensorFlow's ``message``, the OS's text)."""
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    text = text.strip()
    return text.splitlines()[0] if text else type(error).__name__
