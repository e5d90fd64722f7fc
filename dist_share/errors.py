"""Errors that name what the user got wrong, so the CLI can print them and exit non-zero."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. `path` is the dotted key path, e.g. ``model.tower.sharing``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class DataError(ValueError):
    """Input data does not match what the config or the model expects (stream, shape, dtype)."""
