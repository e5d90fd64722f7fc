"""A config field: its default and bounds (`option`), and the check of a section against them."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dist_share.errors import ConfigError, hint

_REQUIRED = object()


def option(
    default: Any = _REQUIRED,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> Any:
    """A config field: its default plus the bounds `validate` enforces (the one place for both)."""
    meta = {"choices": tuple(choices) if choices else None, "minimum": minimum}
    meta.update(maximum=maximum, positive=positive)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    if default is _REQUIRED:
        return dataclasses.field(metadata={**meta, "required": True})
    return dataclasses.field(default=default, metadata=meta)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_kind(hint_type: Any) -> tuple[type | None, bool]:
    """(base type, nullable) of a field annotation such as ``int | None``."""
    nullable = False
    if isinstance(hint_type, types.UnionType) or typing.get_origin(hint_type) is typing.Union:
        hint_type = next(a for a in typing.get_args(hint_type) if a is not type(None))
        nullable = True
    return typing.get_origin(hint_type) or hint_type, nullable


def _expected(kind: type | None, meta: Mapping, nullable: bool) -> str:
    if meta.get("choices"):
        text = "one of " + ", ".join(map(str, meta["choices"]))
    else:
        text = {
            int: "an integer",
            float: "a number",
            bool: "true or false",
            str: "a string",
            list: "a list",
            dict: "a mapping",
        }.get(kind, "a value")
        if meta.get("positive"):
            text += " > 0"
        elif meta.get("minimum") is not None:
            text += f" >= {meta['minimum']:g}"
        if meta.get("maximum") is not None:
            text += f" <= {meta['maximum']:g}"
    return text + (" or null" if nullable else "")


def _check_leaf(path: str, value: Any, kind: Any, nullable: bool, meta: Mapping) -> Any:
    def bad() -> ConfigError:
        return ConfigError(path, f"got {value!r}, expected {_expected(kind, meta, nullable)}")

    if value is None:
        if nullable:
            return None
        raise ConfigError(path, f"is null, expected {_expected(kind, meta, nullable)}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if not math.isfinite(value):
            raise bad()
        value = float(value)
    elif kind in (bool, str, list, dict) and not isinstance(value, kind):
        raise bad()
    choices = meta.get("choices")
    if choices and value not in choices:
        extra = hint(value, choices) if isinstance(value, str) else ""
        extra = extra if "did you mean" in extra else ""
        raise ConfigError(path, f"got {value!r}, expected {_expected(kind, meta, nullable)}{extra}")
    if kind in (int, float) and (
        (meta.get("positive") and value <= 0)
        or (meta.get("minimum") is not None and value < meta["minimum"])
        or (meta.get("maximum") is not None and value > meta["maximum"])
    ):
        raise bad()
    return copy.deepcopy(value)


def parse_section(cls: type, raw: Any, path: str, allowed: Iterable[str] | None = None) -> Any:
    """Build the dataclass ``cls`` from raw data, checking every key; errors name ``path.key``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = list(allowed) if allowed is not None else list(fields)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"got {raw!r}, expected a mapping with keys {', '.join(allowed)}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(join_path(path, str(key)), "unknown key" + hint(key, allowed))
    values = {}
    for name, field in fields.items():
        sub = join_path(path, name)
        kind, nullable = _leaf_kind(type_hints(cls)[name])
        if dataclasses.is_dataclass(kind):
            values[name] = parse_section(kind, raw.get(name), sub)
        elif name in raw:
            values[name] = _check_leaf(sub, raw[name], kind, nullable, field.metadata)
        elif field.metadata.get("required"):
            raise ConfigError(sub, f"is required ({_expected(kind, field.metadata, nullable)})")
    return cls(**values)


# Values that are replaced whole rather than merged key by key when the user gives one of another
# kind: conv2d keys make no sense in an mlp block, nor the default tables beside the user's.
