"""Errors that name what the user got wrong, so the CLI can print them and exit non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config value is wrong. `path` is the dotted key path, e.g. ``model.tower.sharing``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DataError(ValueError):
    """Input data does not match what the config or the model expects (stream, shape, dtype)."""


def hint(key: object, known: Iterable[object], what: str = "known keys") -> str:
    """``; did you mean 'x'?`` for a near miss, else ``; known keys: a, b`` (for error messages)."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; {what}: " + ", ".join(known)
