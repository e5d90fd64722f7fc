"""A config resolved: raw YAML data checked into a `Config`, with each family's defaults and checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dist_share.config.fields import parse_section, type_hints
from dist_share.config.loading import apply_overrides, load_yaml, merge
from dist_share.config.schema import (
    CROSS_DEVICE_OPS,
    FAMILIES,
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    SideConfig,
    StrategyConfig,
    TableConfig,
    TowerConfig,
    TrainingConfig,
)
from dist_share.errors import ConfigError, hint
from dist_share.families.base import Family
from dist_share.families.registry import get_family

_WHOLE_VALUES = (
    ("loss",),
    ("tower", "block"),
    ("query", "block"),
    ("candidate", "block"),
    ("tables",),
    ("query", "features"),
    ("candidate", "features"),
)


def _model_with_defaults(raw: Mapping, family: Family) -> dict:
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
    otherwise when the model is built against the real input specs (`dist_share.families.build.build_model`).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "model",
            "is required (a mapping with at least 'family')"
            if raw is None
            else f"got {raw!r}, expected a mapping",
        )
    if "family" not in raw:
        raise ConfigError("model.family", "is required (one of " + ", ".join(FAMILIES) + ")")
    family = get_family(raw["family"], path="model.family")
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


def check_sampler(data: DataConfig, global_batch_size: int) -> None:
    """A class-balanced sampler needs labelled items and P x K = the global batch.

    Raises:
        ConfigError: naming the ``data.sampler`` key and what it lacks.
    """
    sampler = data.sampler
    if sampler.type != "class_balanced":
        return
    if data.labels != "classes":
        raise ConfigError(
            "data.sampler.type",
            "class_balanced draws rows by class, but the rows have no classes: set "
            "model.loss.mining (batch_hard or semi_hard) to train from single labelled items",
        )
    if data.source == "tfrecord":
        raise ConfigError(
            "data.sampler.type",
            "class_balanced picks rows by class from memory; source tfrecord streams them "
            "(use npz, digits or random)",
        )
    p, k = sampler.classes_per_batch, sampler.examples_per_class
    if p * k != global_batch_size:
        raise ConfigError(
            "data.sampler.examples_per_class",
            f"classes_per_batch x examples_per_class = {p} x {k} = {p * k}, but "
            f"training.batch_size is {global_batch_size} (they must be equal)",
        )


def check_profile(training: TrainingConfig, strategy: str) -> None:
    """The profiler window lies inside the run, and a Horovod timeline has Horovod to record.

    Raises:
        ConfigError: naming the ``training.profile`` key at fault.
    """
    window, steps = training.profile, training.steps
    if window.horovod_timeline and strategy != "horovod":
        raise ConfigError(
            "training.profile.horovod_timeline",
            f"records Horovod's collectives, but strategy.name is {strategy!r}",
        )
    if not window.steps:
        if window.horovod_timeline:
            raise ConfigError(
                "training.profile.horovod_timeline",
                "needs a profiler window: set training.profile.steps",
            )
        return
    if window.start_step >= steps:
        raise ConfigError(
            "training.profile.start_step",
            f"{window.start_step} is past the end of the run (training.steps is {steps})",
        )
    end = window.start_step + window.steps
    if end > steps:
        raise ConfigError(
            "training.profile.steps",
            f"the window ends at step {end}, past the end of the run (training.steps is {steps})",
        )


def read_aliases(training: Any) -> Any:
    """The ``training`` section with its older or YAML-typed spellings made current:
    ``mixed_precision: true`` is ``precision: mixed_float16``, ``jit_compile: true`` is
    ``"true"``.

    Raises:
        ConfigError: ``mixed_precision`` and ``precision`` both given and disagreeing.
    """
    if not isinstance(training, Mapping):
        return training
    out = dict(training)
    if "mixed_precision" in out:
        mixed = out.pop("mixed_precision")
        if not isinstance(mixed, bool):
            raise ConfigError("training.mixed_precision", f"expected true or false, got {mixed!r}")
        implied = "mixed_float16" if mixed else "float32"
        given = out.setdefault("precision", implied)
        if given != implied and (mixed or given == "float32"):
            raise ConfigError(
                "training.mixed_precision",
                f"is {str(mixed).lower()} but training.precision is {given!r}; "
                "set only training.precision",
            )
    if isinstance(out.get("jit_compile"), bool):
        out["jit_compile"] = str(out["jit_compile"]).lower()
    return out


def check_strategy_options(strategy: StrategyConfig, training: TrainingConfig) -> None:
    """Options that only some strategies have.

    Raises:
        ConfigError: naming the key: a cross-device op the strategy lacks, XLA forced under
            Horovod's keras_fit, or float16 loss scaling with keras_fit under Horovod.
    """
    ops = strategy.cross_device_ops
    allowed = {"mirrored": CROSS_DEVICE_OPS, "multiworker": ("auto", "nccl")}.get(strategy.name)
    if ops != "auto" and (allowed is None or ops not in allowed):
        raise ConfigError(
            "strategy.cross_device_ops",
            f"{ops!r} is not an all-reduce of strategy {strategy.name!r} "
            f"(it has {', '.join(allowed) if allowed else 'only auto'})",
        )
    horovod_fit = strategy.name == "horovod" and training.loop == "keras_fit"
    if horovod_fit and training.jit_compile == "true":
        raise ConfigError(
            "training.jit_compile",
            "XLA cannot compile Horovod's operations inside keras_fit's train step; "
            "use loop: custom, which compiles each replica's pass and reduces outside it",
        )
    if horovod_fit and training.loss_scaled:
        raise ConfigError(
            "training.precision",
            "mixed_float16 is not supported with loop: keras_fit under horovod "
            "(use mixed_bfloat16, or loop: custom)",
        )


def validate(raw: Any) -> Config:
    """Fill defaults and check every key of raw config data; returns the `Config`."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"a config is a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(str(key), "unknown key" + hint(key, SECTIONS))
    # The sections that do not depend on the model first: checking the model's blocks imports
    # Keras (and TensorFlow, seconds of start-up), which a typo in `training:` need not wait for.
    sections = {**raw, "training": read_aliases(raw.get("training"))}
    rest = {
        name: parse_section(type_hints(Config)[name], sections.get(name), name)
        for name in SECTIONS[2:]
    }
    check_profile(rest["training"], rest["strategy"].name)
    check_strategy_options(rest["strategy"], rest["training"])
    model_raw = raw.get("model")
    data_raw = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    views = data_raw.get("num_views", DataConfig.num_views)
    model = parse_model(model_raw, views if isinstance(views, int) else None)
    family = get_family(model.family)
    data_given = raw.get("data")
    if data_given is None or isinstance(data_given, Mapping):
        data_given = merge(family.data_defaults(), data_given or {})
    data = parse_section(DataConfig, data_given, "data")
    if data.family is not None and data.family != model.family:
        raise ConfigError("data.family", f"is {data.family!r} but model.family is {model.family!r}")
    labels = family.labels_for(model)
    if data.labels is not None and data.labels != labels:
        raise ConfigError(
            "data.labels",
            f"is {data.labels!r} but model.loss makes it {labels!r}; leave it unset",
        )
    data = dataclasses.replace(data, family=model.family, labels=labels)
    family.check_data(data, model)
    cfg = Config(model=model, data=data, **rest)
    tr = cfg.training
    check_sampler(data, tr.batch_size)
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


def replace(cfg: Config, *overrides: str) -> Config:
    """A new config with ``--set``-style overrides (``"training.steps=5"``), validated again."""
    return validate(apply_overrides(cfg.to_dict(), overrides))
