"""Config files: YAML read safely, ``base:`` merged, ``--set`` overrides applied, dumped, diffed."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dist_share.config.fields import join_path
from dist_share.config.schema import Config
from dist_share.errors import ConfigError


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError("", f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: Mapping, child: Mapping) -> dict:
    """Recursive mapping merge: the child's keys win, nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, following ``base:`` chains (relative to the file naming them)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError("base", f"cycle of base configs: {' -> '.join(map(str, (*_seen, path)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"got {base!r}, expected a path to another YAML config")
    return merge(load_yaml(path.parent / base, (*_seen, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar, list or mapping)."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ConfigError(
            "--set", f"got {text!r}, expected KEY.PATH=VALUE, e.g. training.steps=100"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(key, f"--set value {raw!r} is not valid YAML") from None
    return [k.strip() for k in keys], value


def apply_overrides(cfg: Mapping, overrides: Iterable[str]) -> dict:
    """Apply ``--set`` overrides to raw config data; unknown keys are left for `validate`."""
    out = copy.deepcopy(dict(cfg))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                path = ".".join(keys[: i + 1])
                raise ConfigError(
                    path,
                    f"is {child!r}, not a mapping, so --set {text!r} cannot set a key inside it",
                )
            node = child
        node[keys[-1]] = value
    return out


def dump(cfg: Config) -> str:
    """The resolved config as YAML, sections in a fixed order so that diffs are readable."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=100)


_MISSING = object()


def diff(a: Mapping, b: Mapping, path: str = "") -> list[str]:
    """Dotted key paths whose values differ, e.g. ``training.steps: 600 -> 100``."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        p = join_path(path, str(key))
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff(va, vb, p))
        elif va != vb:
            show = lambda v: "<missing>" if v is _MISSING else repr(v)  # noqa: E731
            out.append(f"{p}: {show(va)} -> {show(vb)}")
    return out
