"""Configs: YAML in, one typed and frozen `Config` out, or a ConfigError naming the key path.

A run is reproducible only if everything it depended on is written down, so every default lives
here, as the default of a dataclass field, and the resolved config is what gets saved in the run
directory. The YAML is parsed and checked once, by `load_config` / `validate`; every module after
that reads attributes (``cfg.training.batch_size``), never nested dicts with string keys.

Checks that belong to an object (a block spec, a loss spec, tower groups) are that object's own
functions; validation calls them with the key path so that the message names the key. What a
model family is (its streams, losses, heads, data) is `dist_share.families`.

Loading uses ``yaml.safe_load`` only. A config may name ``base: other.yaml`` (relative to itself)
to start from another config; keys of the child replace the base's, mappings merge recursively.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dist_share.errors import ConfigError, hint
from dist_share.families import base as families

STRATEGIES = ("local", "mirrored", "multiworker", "horovod")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
SHARING_MODES = ("shared", "separate", "grouped", "switchable")
SECTIONS = ("model", "data", "optimizer", "training", "strategy", "checkpoint", "logging")
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


def default_block() -> dict:
    """The tower block a config gets when it names none."""
    return {
        "type": "conv2d",
        "filters": [16, 32],
        "kernel_size": 3,
        "pool_size": 2,
        "norm": "batch",
        "activation": "relu",
        "dense": [64],
    }


# -- the schema: one frozen dataclass per section ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """``model.tower``: how the streams of a tower family share weights (see towers.SharedTower)."""

    sharing: str = option("shared", choices=SHARING_MODES)
    groups: list | None = None
    use_shared: bool = True
    fold: bool = True
    # Read as a mapping; the family's check_model replaces it with the checked blocks.BlockSpec
    # (every default filled in), so the tower is built without checking the spec again.
    block: dict = option(default_block())


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """One entry of ``model.tables``: an embedding table the two towers may share."""

    vocab_size: int = option(positive=True)
    dim: int | None = option(None, positive=True)  # null: model.embedding_dim


@dataclasses.dataclass(frozen=True)
class SideConfig:
    """``model.query`` / ``model.candidate`` of a two-tower model."""

    features: dict | None = None
    combiner: str = option("mean", choices=("mean", "sum"))
    # Read as a mapping; checked once into a blocks.BlockSpec by the two-tower family.
    block: dict = option({"type": "mlp", "units": [64], "activation": "relu"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``model``: the family and its parts. Which keys a family reads is the family's to say."""

    family: str = option(choices=families.NAMES)
    embedding_dim: int = option(32, positive=True)
    loss: dict | None = None
    head: str | None = None
    num_classes: int = option(10, positive=True)
    tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    tables: dict[str, TableConfig] | None = None
    query: SideConfig = dataclasses.field(default_factory=SideConfig)
    candidate: SideConfig = dataclasses.field(default_factory=SideConfig)

    @property
    def family_spec(self) -> families.Family:
        return families.get(self.family)


@dataclasses.dataclass(frozen=True)
class ViewsConfig:
    max_shift: int = option(1, minimum=0, maximum=3)
    noise_std: float = option(0.2, minimum=0.0)
    occlusion: int = option(4, minimum=0, maximum=8)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = option(500, positive=True)
    num_items: int = option(2000, positive=True)
    num_clusters: int = option(20, minimum=2)
    preferred_clusters: int = option(2, positive=True)
    history_length: int = option(10, positive=True)
    zipf_exponent: float = option(1.1, minimum=0.0)
    positive_fraction: float = option(0.5, minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class RandomConfig:
    num_examples: int = option(4096, positive=True)
    image_shape: list = option([8, 8, 1])


@dataclasses.dataclass(frozen=True)
class TFRecordConfig:
    """``data.tfrecord``: sharded TFRecord files written by ``dist-share data convert``.

    ``train`` and ``eval`` are each a directory holding a converted data set (its manifest's
    shards of that split), one shard file, or a glob of shard files (docs/DATA.md).
    """

    train: str | None = None
    eval: str | None = None  # null: the eval split of the ``train`` directory
    sharding: str = option("auto", choices=("auto", "file", "example"))
    cycle_length: int = option(8, positive=True)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``data``: where examples come from. ``family`` is copied from ``model.family``."""

    source: str | None = option(None, choices=families.SOURCES)
    family: str | None = option(None, choices=families.NAMES)
    num_views: int = option(3, minimum=1)
    eval_fraction: float = option(0.25, positive=True, maximum=0.9)
    split_seed: int = 0
    train_examples: int = option(16384, positive=True)
    eval_examples: int = option(2048, positive=True)
    shuffle_buffer: int = option(16384, positive=True)
    views: ViewsConfig = dataclasses.field(default_factory=ViewsConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    random: RandomConfig = dataclasses.field(default_factory=RandomConfig)
    train_path: str | None = None
    eval_path: str | None = None
    tfrecord: TFRecordConfig = dataclasses.field(default_factory=TFRecordConfig)

    @property
    def family_spec(self) -> families.Family:
        return families.get(self.family)

    @property
    def streams(self) -> list[str]:
        """Stream names in model input order."""
        return self.family_spec.streams(self)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = option("adam", choices=OPTIMIZERS)
    learning_rate: float = option(0.001, positive=True)
    scale_lr_by_world_size: bool = False
    clipnorm: float | None = option(None, positive=True)
    weight_decay: float | None = option(None, minimum=0.0)
    momentum: float = option(0.0, minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """``training``: the loop. ``batch_size`` is the GLOBAL batch over all replicas."""

    steps: int = option(600, positive=True)
    batch_size: int = option(64, positive=True)
    grad_accum_steps: int = option(1, positive=True)
    steps_per_loop: int = option(1, positive=True)
    mixed_precision: bool = False
    loop: str = option("custom", choices=("custom", "keras_fit"))
    log_every: int = option(50, positive=True)
    eval_every: int = option(200, minimum=0)
    eval_batches: int | None = option(None, positive=True)
    deterministic: bool = False
    seed: int = 0
    # Seconds without a peer's heartbeat before the job is ended (exit 3; watchdog.py). Below
    # Gloo's own 30 s receive timeout, so the message that names the rank comes first.
    stall_timeout: float = option(20.0, minimum=5.0)
    # What a non-finite loss or reduced gradient does (nonfinite.py): end the run, or skip it.
    on_nonfinite: str = option("stop", choices=("stop", "skip"))


@dataclasses.dataclass(frozen=True)
class HorovodConfig:
    compression: str = option("none", choices=("none", "fp16", "bf16"))
    op: str = option("average", choices=("average", "sum"))
    grouped_allreduce: bool = True
    sparse_as_dense: bool = False
    # Elastic Horovod (elastic.py): workers may leave and join while the job runs (horovodrun
    # --min-np/--max-np/--host-discovery-script); the state is committed every commit_every steps.
    elastic: bool = False
    commit_every: int = option(10, positive=True)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    dedup: bool = True
    dense_threshold: float | None = option(0.5, minimum=0.0, maximum=1.0)
    dense_switch: str = option("measured", choices=("measured", "static"))


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    name: str = option("local", choices=STRATEGIES)
    num_cpu_devices: int | None = option(None, positive=True)
    horovod: HorovodConfig = dataclasses.field(default_factory=HorovodConfig)
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(200, minimum=0)
    keep: int = option(3, positive=True)
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole resolved config. Build it with `load_config` or `validate`; change it with `replace`."""

    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain data (what `dump` writes and `validate` reads back); the model section holds
        only the keys its family reads."""
        out = _to_dict(self)
        keys = self.model.family_spec.model_keys
        out["model"] = {k: v for k, v in out["model"].items() if k in keys}
        return out

    def replace(self, *overrides: str) -> Config:
        """A new config with ``--set``-style overrides (``"training.steps=5"``), validated again."""
        return validate(apply_overrides(self.to_dict(), overrides))


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


# -- Loading, merging, overrides ---------------------------------------------------------------
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


# -- Validation --------------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
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
            raise ConfigError(_join(path, str(key)), "unknown key" + hint(key, allowed))
    values = {}
    for name, field in fields.items():
        sub = _join(path, name)
        kind, nullable = _leaf_kind(_hints(cls)[name])
        if dataclasses.is_dataclass(kind):
            values[name] = parse_section(kind, raw.get(name), sub)
        elif name in raw:
            values[name] = _check_leaf(sub, raw[name], kind, nullable, field.metadata)
        elif field.metadata.get("required"):
            raise ConfigError(sub, f"is required ({_expected(kind, field.metadata, nullable)})")
    return cls(**values)


# Values that are replaced whole rather than merged key by key when the user gives one of another
# kind: conv2d keys make no sense in an mlp block, nor the default tables beside the user's.
_WHOLE_VALUES = (
    ("loss",),
    ("tower", "block"),
    ("query", "block"),
    ("candidate", "block"),
    ("tables",),
    ("query", "features"),
    ("candidate", "features"),
)


def _model_with_defaults(raw: Mapping, family: families.Family) -> dict:
    """Merge the defaults under ``raw``. A block or loss of another ``type`` replaces the default
    one and so does a tables/features mapping with names the default lacks; otherwise keys merge,
    so ``--set model.tower.block.filters=[8]`` edits the default block."""
    defaults = merge(
        {
            "tower": {"block": TowerConfig().block},
            "query": {"block": SideConfig().block},
            "candidate": {"block": SideConfig().block},
        },
        family.model_defaults(),
    )
    defaults = {k: v for k, v in defaults.items() if k in family.model_keys}
    for whole in _WHOLE_VALUES:
        node, dnode = raw, defaults
        for key in whole[:-1]:
            node = node.get(key) if isinstance(node, Mapping) else None
            dnode = dnode.get(key, {})
        given = node.get(whole[-1]) if isinstance(node, Mapping) else None
        default = dnode.get(whole[-1])
        if not isinstance(given, Mapping) or not isinstance(default, Mapping):
            continue
        if "type" in default:
            replace = given.get("type", default["type"]) != default["type"]
        else:
            replace = not set(given) <= set(default)
        if replace:
            dnode.pop(whole[-1])
    return merge(defaults, raw)


def parse_model(raw: Any, num_views: int | None = None) -> ModelConfig:
    """The ``model`` section alone: family defaults filled, every key and spec checked.

    Checks that need the data (stream names and counts) run with ``num_views`` if given, and
    otherwise when the model is built against the real input specs (`models.build_model`).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "model",
            "is required (a mapping with at least 'family')"
            if raw is None
            else f"got {raw!r}, expected a mapping",
        )
    if "family" not in raw:
        raise ConfigError("model.family", "is required (one of " + ", ".join(families.NAMES) + ")")
    family = families.get(raw["family"], path="model.family")
    model = parse_section(
        ModelConfig, _model_with_defaults(raw, family), "model", family.model_keys
    )
    if isinstance(model.tables, Mapping):
        tables = {
            name: parse_section(TableConfig, table, f"model.tables.{name}")
            for name, table in model.tables.items()
        }
        model = dataclasses.replace(model, tables=tables)
    return family.check_model(model, num_views)


def validate(raw: Any) -> Config:
    """Fill defaults and check every key of raw config data; returns the `Config`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"a config is a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(str(key), "unknown key" + hint(key, SECTIONS))
    # The sections that do not depend on the model first: checking the model's blocks imports
    # Keras (and TensorFlow, seconds of start-up), which a typo in `training:` need not wait for.
    rest = {name: parse_section(_hints(Config)[name], raw.get(name), name) for name in SECTIONS[2:]}
    model_raw = raw.get("model")
    data_raw = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    views = data_raw.get("num_views", DataConfig.num_views)
    model = parse_model(model_raw, views if isinstance(views, int) else None)
    family = model.family_spec
    data_given = raw.get("data")
    if data_given is None or isinstance(data_given, Mapping):
        data_given = merge(family.data_defaults(), data_given or {})
    data = parse_section(DataConfig, data_given, "data")
    if data.family is not None and data.family != model.family:
        raise ConfigError("data.family", f"is {data.family!r} but model.family is {model.family!r}")
    data = dataclasses.replace(data, family=model.family)
    family.check_data(data, model)
    cfg = Config(model=model, data=data, **rest)
    tr = cfg.training
    if tr.batch_size % tr.grad_accum_steps:
        raise ConfigError(
            "training.grad_accum_steps",
            f"{tr.grad_accum_steps} does not divide training.batch_size {tr.batch_size}",
        )
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, merge ``base:``, apply ``--set`` overrides, fill defaults and validate."""
    return validate(apply_overrides(load_yaml(path), overrides))


def defaults(family: str = "siamese", *overrides: str) -> Config:
    """The default config of a family, with optional overrides (for code, tests and notebooks)."""
    return validate(apply_overrides({"model": {"family": family}}, overrides))


def dump(cfg: Config) -> str:
    """The resolved config as YAML, sections in a fixed order so that diffs are readable."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=100)


_MISSING = object()


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
