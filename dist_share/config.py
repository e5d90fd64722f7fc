"""Configs: YAML in, one fully resolved dict out, or a ConfigError naming the key path.

A run is reproducible only if everything it depended on is written down, so every default is
filled in here (not scattered through the code that reads the config) and the resolved dict is
what gets saved in the run directory. Validation is schema driven so that every message has the
same shape: the dotted key path, the value that was given, and what was expected.

Loading uses ``yaml.safe_load`` only. A config may name ``base: other.yaml`` (relative to itself)
to start from another config; keys of the child replace the base's, dicts merge recursively.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dist_share.errors import ConfigError

FAMILIES = ("siamese", "triplet", "multiview", "two_tower")
TOWER_FAMILIES = ("siamese", "triplet", "multiview")
SHARING_MODES = ("shared", "separate", "grouped", "switchable")
BLOCK_TYPES = ("mlp", "conv2d", "embedding", "gru", "transformer")
STRATEGIES = ("local", "mirrored", "multiworker", "horovod")
DATA_SOURCES = ("digits", "two_tower_synthetic", "npz", "random")

HEADS = {
    "siamese": ("l2", "cosine"),
    "triplet": ("l2",),
    "multiview": ("concat", "mean", "sum"),
}
LOSSES = {
    "siamese": ("contrastive",),
    "triplet": ("triplet",),
    "multiview": ("sparse_categorical_crossentropy",),
    "two_tower": ("binary", "in_batch_softmax"),
}
# Options each loss type takes, with defaults (mirrors losses.get_loss).
LOSS_OPTIONS = {
    "contrastive": {"margin": 1.0},
    "triplet": {"margin": 1.0},
    "in_batch_softmax": {"temperature": 0.1},
    "binary": {},
    "sparse_categorical_crossentropy": {},
}
# Keys each block type accepts besides `type` (mirrors blocks._BLOCK_KEYS; a test keeps them equal).
BLOCK_KEYS = {
    "mlp": ("units", "activation", "norm"),
    "conv2d": ("filters", "kernel_size", "pool_size", "norm", "activation", "dense"),
    "embedding": ("vocab_size", "embedding_dim", "combiner", "units", "activation"),
    "gru": ("units",),
    "transformer": ("units", "num_heads"),
}
_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One leaf of the schema: its type, default and allowed values."""

    kind: str  # "int" | "float" | "bool" | "str" | "list" | "dict" | "any"
    default: Any = None
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False  # strictly greater than 0
    nullable: bool = False
    required: bool = False

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        text = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "list": "a list",
            "dict": "a mapping",
            "any": "a value",
        }[self.kind]
        if self.positive:
            text += " > 0"
        elif self.minimum is not None:
            text += f" >= {self.minimum:g}"
        if self.maximum is not None:
            text += f" <= {self.maximum:g}"
        return text + (" or null" if self.nullable else "")


def default_block() -> dict:
    """The tower block a config gets when it names none (also models.build_model's default)."""
    return {
        "type": "conv2d",
        "filters": [16, 32],
        "kernel_size": 3,
        "pool_size": 2,
        "norm": "batch",
        "activation": "relu",
        "dense": [64],
    }


_TOWER = {
    "sharing": Field("str", "shared", choices=SHARING_MODES),
    "groups": Field("list", None, nullable=True),
    "use_shared": Field("bool", True),
    "fold": Field("bool", True),
    "block": Field("dict", None),
}
_MODEL_COMMON = {
    "family": Field("str", required=True, choices=FAMILIES),
    "embedding_dim": Field("int", 32, positive=True),
    "loss": Field("dict", None),
}
_MODEL = {
    "siamese": {
        **_MODEL_COMMON,
        "head": Field("str", "l2", choices=HEADS["siamese"]),
        "tower": _TOWER,
    },
    "triplet": {
        **_MODEL_COMMON,
        "head": Field("str", "l2", choices=HEADS["triplet"]),
        "tower": _TOWER,
    },
    "multiview": {
        **_MODEL_COMMON,
        "head": Field("str", "concat", choices=HEADS["multiview"]),
        "tower": _TOWER,
        "num_classes": Field("int", 10, positive=True),
    },
    "two_tower": {
        **_MODEL_COMMON,
        "tables": Field("dict", None),
        "query": {
            "features": Field("dict", None),
            "combiner": Field("str", "mean", choices=("mean", "sum")),
            "block": Field("dict", None),
        },
        "candidate": {
            "features": Field("dict", None),
            "combiner": Field("str", "mean", choices=("mean", "sum")),
            "block": Field("dict", None),
        },
    },
}
_DATA = {
    "source": Field("str", None, choices=DATA_SOURCES),
    "family": Field("str", None, choices=FAMILIES, nullable=True),
    "num_views": Field("int", 3, minimum=1),
    "eval_fraction": Field("float", 0.25, positive=True, maximum=0.9),
    "split_seed": Field("int", 0),
    "train_examples": Field("int", 16384, positive=True),
    "eval_examples": Field("int", 2048, positive=True),
    "shuffle_buffer": Field("int", 16384, positive=True),
    "views": {
        "max_shift": Field("int", 1, minimum=0, maximum=3),
        "noise_std": Field("float", 0.2, minimum=0.0),
        "occlusion": Field("int", 4, minimum=0, maximum=8),
    },
    "synthetic": {
        "num_users": Field("int", 500, positive=True),
        "num_items": Field("int", 2000, positive=True),
        "num_clusters": Field("int", 20, minimum=2),
        "preferred_clusters": Field("int", 2, positive=True),
        "history_length": Field("int", 10, positive=True),
        "zipf_exponent": Field("float", 1.1, minimum=0.0),
        "positive_fraction": Field("float", 0.5, minimum=0.0, maximum=1.0),
    },
    "random": {
        "num_examples": Field("int", 4096, positive=True),
        "image_shape": Field("list", [8, 8, 1]),
    },
    "train_path": Field("str", None, nullable=True),
    "eval_path": Field("str", None, nullable=True),
}
_OPTIMIZER = {
    "name": Field("str", "adam", choices=("adam", "adamw", "sgd", "rmsprop", "adagrad")),
    "learning_rate": Field("float", 0.001, positive=True),
    "scale_lr_by_world_size": Field("bool", False),
    "clipnorm": Field("float", None, positive=True, nullable=True),
    "weight_decay": Field("float", None, minimum=0.0, nullable=True),
    "momentum": Field("float", 0.0, minimum=0.0, maximum=1.0),
}
_TRAINING = {
    "steps": Field("int", 600, positive=True),
    "batch_size": Field("int", 64, positive=True),
    "grad_accum_steps": Field("int", 1, positive=True),
    "mixed_precision": Field("bool", False),
    "loop": Field("str", "custom", choices=("custom", "keras_fit")),
    "log_every": Field("int", 50, positive=True),
    "eval_every": Field("int", 200, minimum=0),
    "eval_batches": Field("int", None, positive=True, nullable=True),
    "deterministic": Field("bool", False),
    "seed": Field("int", 0),
    # issue 11: seconds without a peer's heartbeat before the job is aborted (exit 3)
    "stall_timeout": Field("float", 20.0, minimum=5.0),
    # issue 11: what a non-finite loss / reduced gradient does (dist_share/nonfinite.py)
    "on_nonfinite": Field("str", "stop", choices=("stop", "skip")),
}
_STRATEGY = {
    "name": Field("str", "local", choices=STRATEGIES),
    "num_cpu_devices": Field("int", None, positive=True, nullable=True),
    "horovod": {
        "compression": Field("str", "none", choices=("none", "fp16", "bf16")),
        "op": Field("str", "average", choices=("average", "sum")),
        "grouped_allreduce": Field("bool", True),
        "sparse_as_dense": Field("bool", False),
    },
    "sparse": {
        "dedup": Field("bool", True),
        "dense_threshold": Field("float", 0.5, minimum=0.0, maximum=1.0),
    },
}
_CHECKPOINT = {
    "every": Field("int", 200, minimum=0),
    "keep": Field("int", 3, positive=True),
    "resume": Field("bool", True),
}
_LOGGING = {"tensorboard": Field("bool", True), "progress_bar": Field("bool", True)}

SECTIONS = ("model", "data", "optimizer", "training", "strategy", "checkpoint", "logging")
OPTIMIZERS = _OPTIMIZER["name"].choices


def _schema_defaults(schema: Mapping) -> dict:
    return {
        k: _schema_defaults(v) if isinstance(v, Mapping) else copy.deepcopy(v.default)
        for k, v in schema.items()
    }


def runtime_defaults() -> dict:
    """Defaults of the sections the trainer reads, for code that builds a partial config by hand
    (tests, notebooks, examples); the schema above stays their only source."""
    sections = {
        "optimizer": _OPTIMIZER,
        "training": _TRAINING,
        "strategy": _STRATEGY,
        "checkpoint": _CHECKPOINT,
        "logging": _LOGGING,
    }
    return {name: _schema_defaults(schema) for name, schema in sections.items()}


def _top_schema(family: str) -> dict:
    return {
        "model": _MODEL[family],
        "data": _DATA,
        "optimizer": _OPTIMIZER,
        "training": _TRAINING,
        "strategy": _STRATEGY,
        "checkpoint": _CHECKPOINT,
        "logging": _LOGGING,
    }


def _family_defaults(family: str) -> dict:
    """Defaults that depend on the family. Blocks and losses are whole values: a user's block
    replaces the default block rather than merging with it (conv2d keys make no sense in an mlp)."""
    if family == "two_tower":
        mlp = {"type": "mlp", "units": [64], "activation": "relu"}
        return {
            "model": {
                "loss": {"type": "binary"},
                "tables": {"users": {"vocab_size": 500}, "items": {"vocab_size": 2000}},
                "query": {
                    "features": {"query_user": "users", "query_history": "items"},
                    "block": mlp,
                },
                "candidate": {"features": {"candidate_item": "items"}, "block": mlp},
            },
            "data": {"source": "two_tower_synthetic"},
        }
    loss = {
        "siamese": {"type": "contrastive"},
        "triplet": {"type": "triplet"},
        "multiview": {"type": "sparse_categorical_crossentropy"},
    }[family]
    return {
        "model": {"loss": loss, "tower": {"block": default_block()}},
        "data": {"source": "digits"},
    }


def _with_defaults(raw: Mapping, family: str) -> dict:
    """Merge the family defaults under ``raw``. A block or loss of another ``type`` replaces the
    default one (conv2d keys make no sense in an mlp) and so does a tables/features mapping with
    names the default lacks; otherwise keys merge, so ``--set model.tower.block.filters=[8]``
    edits the default block."""
    defaults = _family_defaults(family)
    model = raw.get("model") or {}
    for whole in (
        ("loss",),
        ("tower", "block"),
        ("query", "block"),
        ("candidate", "block"),
        ("tables",),
        ("query", "features"),
        ("candidate", "features"),
    ):
        node, dnode = model, defaults["model"]
        for key in whole[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
            dnode = dnode.get(key, {})
        given, default = (
            (node.get(whole[-1]) if isinstance(node, Mapping) else None),
            dnode.get(whole[-1]),
        )
        if not isinstance(given, Mapping) or not isinstance(default, Mapping):
            continue
        if "type" in default:
            replace = given.get("type", default["type"]) != default["type"]
        else:
            replace = not set(given) <= set(default)
        if replace:
            dnode.pop(whole[-1])
    return merge(defaults, raw)


# ----------------------------------------------------------------------------------------------
# Loading, merging, overrides


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
    """Recursive dict merge: the child's keys win, nested mappings merge key by key."""
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
    """Apply ``--set`` overrides; unknown keys are left for validation to report (with hints)."""
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


# ----------------------------------------------------------------------------------------------
# Validation


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _hint(key: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; known keys: " + ", ".join(known)


def _check_leaf(path: str, value: Any, field: Field) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(path, f"is null, expected {field.expected()}")
    kind = field.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"got {value!r}, expected {field.expected()}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    elif kind == "list":
        if not isinstance(value, list):
            raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    elif kind == "dict" and not isinstance(value, dict):
        raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    if field.choices and value not in field.choices:
        raise ConfigError(
            path,
            f"got {value!r}, expected {field.expected()}"
            + (
                _hint(value, field.choices).replace("known keys", "choices")
                if isinstance(value, str)
                else ""
            ),
        )
    if kind in ("int", "float"):
        bad = (
            (field.positive and value <= 0)
            or (field.minimum is not None and value < field.minimum)
            or (field.maximum is not None and value > field.maximum)
        )
        if bad:
            raise ConfigError(path, f"got {value!r}, expected {field.expected()}")
    return value


def _validate(path: str, value: Any, schema: Mapping) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"got {value!r}, expected a mapping with keys {', '.join(schema)}")
    for key in value:
        if key not in schema:
            raise ConfigError(_join(path, str(key)), "unknown key" + _hint(key, schema))
    out = {}
    for key, sub in schema.items():
        sub_path = _join(path, key)
        given = value.get(key, _MISSING)
        if isinstance(sub, Mapping):
            out[key] = _validate(sub_path, None if given is _MISSING else given, sub)
        elif given is _MISSING:
            if sub.required:
                raise ConfigError(sub_path, f"is required ({sub.expected()})")
            out[key] = copy.deepcopy(sub.default)
        else:
            out[key] = _check_leaf(sub_path, given, sub)
    return out


def _check_block(path: str, block: Any) -> None:
    if not isinstance(block, dict):
        raise ConfigError(path, f"got {block!r}, expected a mapping with a 'type' key")
    if "type" not in block:
        raise ConfigError(f"{path}.type", f"is required (one of {', '.join(BLOCK_TYPES)})")
    kind = _check_leaf(f"{path}.type", block["type"], Field("str", choices=BLOCK_TYPES))
    allowed = ("type", *BLOCK_KEYS[kind])
    for key in block:
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}", f"unknown key for a {kind} block" + _hint(key, allowed)
            )


def _check_loss(family: str, loss: Any) -> None:
    path = "model.loss"
    if not isinstance(loss, dict) or "type" not in loss:
        raise ConfigError(f"{path}.type", f"is required (one of {', '.join(LOSSES[family])})")
    kind = _check_leaf(f"{path}.type", loss["type"], Field("str", choices=LOSSES[family]))
    options = LOSS_OPTIONS[kind]
    for key in loss:
        if key != "type" and key not in options:
            raise ConfigError(
                f"{path}.{key}", f"unknown option for loss {kind}" + _hint(key, options or ["type"])
            )
    for key, default in options.items():
        loss[key] = _check_leaf(
            f"{path}.{key}", loss.get(key, default), Field("float", positive=True)
        )


def family_streams(family: str, num_views: int = 3) -> list[str]:
    """The stream names a family's data carries, in model input order (see ARCHITECTURE.md)."""
    if family == "siamese":
        return ["left", "right"]
    if family == "triplet":
        return ["anchor", "positive", "negative"]
    if family == "multiview":
        return [f"view{i}" for i in range(num_views)]
    return ["query_user", "query_history", "candidate_item"]


def _check_model(model: dict, data: dict) -> None:
    family = model["family"]
    _check_loss(family, model["loss"])
    streams = family_streams(family, data["num_views"])
    if family in TOWER_FAMILIES:
        tower = model["tower"]
        _check_block("model.tower.block", tower["block"])
        if tower["sharing"] == "grouped":
            groups = tower["groups"]
            n = len(streams)
            if groups is None:
                raise ConfigError(
                    "model.tower.groups",
                    "is required for sharing: grouped (a partition of stream indices)",
                )
            flat = [i for g in groups for i in (g if isinstance(g, list) else [g])]
            if not all(isinstance(g, list) and g for g in groups) or sorted(flat) != list(range(n)):
                raise ConfigError(
                    "model.tower.groups",
                    f"got {groups!r}, expected non-empty lists partitioning the "
                    f"stream indices 0..{n - 1} of streams {streams}",
                )
        elif tower["groups"] is not None:
            raise ConfigError(
                "model.tower.groups",
                f"is only used with sharing: grouped (sharing is {tower['sharing']!r})",
            )
        return
    tables = model["tables"]
    if not tables:
        raise ConfigError(
            "model.tables", "is required for family two_tower, e.g. {users: {vocab_size: 500}}"
        )
    for name, table in tables.items():
        if isinstance(table, dict):
            for key in table:
                if key not in ("vocab_size", "dim"):
                    raise ConfigError(
                        f"model.tables.{name}.{key}",
                        "unknown key" + _hint(key, ("vocab_size", "dim")),
                    )
        size = table.get("vocab_size") if isinstance(table, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(
                f"model.tables.{name}.vocab_size", f"got {size!r}, expected an integer > 0"
            )
    used = {}
    for side in ("query", "candidate"):
        feats = model[side]["features"]
        if not feats:
            raise ConfigError(
                f"model.{side}.features", "is required: a mapping {stream_name: table_name}"
            )
        _check_block(f"model.{side}.block", model[side]["block"])
        for stream, table in feats.items():
            if stream not in streams:
                raise ConfigError(
                    f"model.{side}.features.{stream}",
                    f"is not a two_tower stream; streams are {streams}{_hint(stream, streams)}",
                )
            if table not in tables:
                raise ConfigError(
                    f"model.{side}.features.{stream}",
                    f"names table {table!r}, expected one of {', '.join(tables)}",
                )
            used[stream] = table
    missing = [s for s in streams if s not in used]
    if missing:
        raise ConfigError(
            "model.query.features", f"streams {missing} of the data are not fed to either tower"
        )
    if data["source"] in ("two_tower_synthetic", "random"):
        syn = data["synthetic"]
        for stream, count_key in (
            ("query_user", "num_users"),
            ("candidate_item", "num_items"),
            ("query_history", "num_items"),
        ):
            table = used[stream]
            if tables[table]["vocab_size"] < syn[count_key]:
                raise ConfigError(
                    f"model.tables.{table}.vocab_size",
                    f"is {tables[table]['vocab_size']} but data.synthetic.{count_key} is {syn[count_key]} (stream {stream})",
                )


def validate(raw: Mapping) -> dict:
    """Fill defaults and check every key; returns the resolved config or raises ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"a config is a mapping of sections, got {type(raw).__name__}")
    model = raw.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(
            "model",
            "is required (a mapping with at least 'family')"
            if model is None
            else f"got {model!r}, expected a mapping",
        )
    if "family" not in model:
        raise ConfigError("model.family", f"is required ({_MODEL_COMMON['family'].expected()})")
    family = _check_leaf("model.family", model["family"], _MODEL_COMMON["family"])
    raw = _with_defaults(raw, family)
    cfg = _validate("", raw, _top_schema(family))
    data = cfg["data"]
    if data["family"] is None:
        data["family"] = family
    elif data["family"] != family:
        raise ConfigError("data.family", f"is {data['family']!r} but model.family is {family!r}")
    ok_sources = (
        ("two_tower_synthetic", "npz", "random")
        if family == "two_tower"
        else ("digits", "npz", "random")
    )
    if data["source"] not in ok_sources:
        raise ConfigError(
            "data.source",
            f"got {data['source']!r}, expected one of {', '.join(ok_sources)} for family {family}",
        )
    if data["source"] == "npz" and not data["train_path"]:
        raise ConfigError(
            "data.train_path",
            "is required for source: npz (a .npz file with one array per stream and 'labels')",
        )
    shape = data["random"]["image_shape"]
    if not (shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(
            "data.random.image_shape",
            f"got {shape!r}, expected a list of positive integers, e.g. [8, 8, 1]",
        )
    _check_model(cfg["model"], data)
    tr = cfg["training"]
    if tr["batch_size"] % tr["grad_accum_steps"]:
        raise ConfigError(
            "training.grad_accum_steps",
            f"{tr['grad_accum_steps']} does not divide training.batch_size {tr['batch_size']}",
        )
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Read, merge ``base:``, apply ``--set`` overrides, fill defaults and validate."""
    return validate(apply_overrides(load_yaml(path), overrides))


def dump(cfg: Mapping) -> str:
    """The resolved config as YAML, sections in a fixed order so that diffs are readable."""
    ordered = {k: cfg[k] for k in SECTIONS if k in cfg}
    ordered.update({k: v for k, v in cfg.items() if k not in ordered})
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None, width=100)


def diff(a: Mapping, b: Mapping, path: str = "") -> list[str]:
    """Dotted key paths whose values differ, e.g. ``training.steps: 600 -> 100``."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        p = _join(path, str(key))
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff(va, vb, p))
        elif va != vb:
            show = lambda v: "<missing>" if v is _MISSING else repr(v)  # noqa: E731
            out.append(f"{p}: {show(va)} -> {show(vb)}")
    return out
