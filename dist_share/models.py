"""Model families built from the plain-data ``model:`` section of a config.

`build_model` checks the config against the data's input specs *before* creating any variable,
so a wrong stream name or shape fails with a `ConfigError` naming the key path or stream rather
than with a shape error deep inside Keras. Call it inside ``strategy.scope()``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import keras

from dist_share import heads, losses
from dist_share.blocks import CombineFields, build_block, check_block_input, validate_block_spec
from dist_share.config import FAMILIES, HEADS, LOSSES, default_block
from dist_share.errors import ConfigError
from dist_share.towers import SHARING_MODES, SharedTower, validate_groups

# The families and which losses and heads fit each are config.py's tables (Keras-free, so that
# `dist-share config` validates without loading TensorFlow); the builders use the same ones.
MODEL_FAMILIES = FAMILIES
_FAMILY_LOSSES = LOSSES
_FAMILY_HEADS = HEADS
_DEFAULT_LOSS = {
    "siamese": {"type": "contrastive", "margin": 1.0},
    "triplet": {"type": "triplet", "margin": 1.0},
    "multiview": {"type": "sparse_categorical_crossentropy"},
    "two_tower": {"type": "binary"},
}
_TOWER_KEYS = ("sharing", "groups", "use_shared", "fold", "block")
_COMMON_KEYS = ("family", "embedding_dim", "loss")
_FAMILY_KEYS = {
    "siamese": ("tower", "head"),
    "triplet": ("tower", "head"),
    "multiview": ("tower", "head", "num_classes"),
    "two_tower": ("tables", "query", "candidate"),
}


@dataclasses.dataclass
class ModelSpec:
    """What the trainer needs: the model, a per-example loss and per-example metrics."""

    model: keras.Model
    loss: Callable[[Any, Any], Any]
    metrics: dict[str, Callable[[Any, Any], Any]]
    stream_names: list[str]


def _family_streams(family: str, input_specs: Mapping[str, Any]) -> list[str]:
    if family == "siamese":
        return ["left", "right"]
    if family == "triplet":
        return ["anchor", "positive", "negative"]
    if family == "multiview":
        views = sorted(
            (int(m.group(1)), name)
            for name in input_specs
            if (m := re.fullmatch(r"view(\d+)", name))
        )
        if not views:
            raise ConfigError(
                "model.family", "multiview needs streams view0 ... view{N-1}; the data has none"
            )
        names = [name for _, name in views]
        expected = [f"view{i}" for i in range(len(names))]
        if names != expected:
            missing = sorted(set(expected) - set(names))
            raise ConfigError(
                f"stream {missing[0] if missing else names[-1]}",
                f"multiview streams must be view0 ... view{len(names) - 1} without gaps, got {names}",
            )
        return names
    raise AssertionError(family)


def _check_streams(expected: list[str], input_specs: Mapping[str, Any]) -> None:
    for name in expected:
        if name not in input_specs:
            raise ConfigError(
                f"stream {name}",
                f"missing stream {name!r}: the model needs {expected}, the data has {sorted(input_specs)}",
            )
    for name in input_specs:
        if name not in expected:
            raise ConfigError(
                f"stream {name}",
                f"extra stream {name!r} that the model does not use (it uses {expected})",
            )


def _spec_shape_dtype(spec: Any) -> tuple[tuple, str]:
    shape = tuple(spec.shape.as_list() if hasattr(spec.shape, "as_list") else spec.shape)
    dtype = getattr(spec.dtype, "name", str(spec.dtype))
    return shape, dtype


def _check_keys(cfg: Mapping[str, Any], allowed: tuple, path: str) -> None:
    for key in cfg:
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}" if path else key, f"unknown key; allowed: {sorted(allowed)}"
            )


def _positive_int(cfg: Mapping[str, Any], key: str, default: int, path: str) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}.{key}", f"must be a positive integer, got {value!r}")
    return value


def _inputs(names: list[str], input_specs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name in names:
        shape, dtype = _spec_shape_dtype(input_specs[name])
        out[name] = keras.Input(shape=shape, dtype=dtype, name=name)
    return out


def _tower(
    cfg: Mapping[str, Any], names: list[str], input_specs: Mapping[str, Any], embedding_dim: int
) -> SharedTower:
    tower = dict(cfg.get("tower") or {})
    _check_keys(tower, _TOWER_KEYS, "model.tower")
    sharing = tower.get("sharing", "shared")
    if sharing not in SHARING_MODES:
        raise ConfigError(
            "model.tower.sharing",
            f"unknown sharing mode {sharing!r}; expected one of {SHARING_MODES}",
        )
    block = validate_block_spec(tower.get("block") or default_block(), "model.tower.block")
    groups = tower.get("groups")
    if sharing == "grouped":
        groups = validate_groups(groups, len(names), "model.tower.groups")
    elif groups is not None:
        raise ConfigError(
            "model.tower.groups",
            f"groups are only read with sharing: grouped (sharing is {sharing!r}); set it to null",
        )
    shapes = {}
    for name in names:
        shape, dtype = _spec_shape_dtype(input_specs[name])
        check_block_input(block, shape, dtype, f"stream {name}")
        shapes[name] = shape
    sets = (
        [names]
        if sharing in ("shared", "switchable")
        else ([[names[i] for i in g] for g in groups] if sharing == "grouped" else [])
    )
    for members in sets:
        first = members[0]
        for other in members[1:]:
            if shapes[other] != shapes[first]:
                raise ConfigError(
                    f"stream {other}",
                    f"shape {list(shapes[other])} differs from stream {first!r} {list(shapes[first])}, but they share weights (model.tower.sharing: {sharing})",
                )
    for key in ("fold", "use_shared"):
        if not isinstance(tower.get(key, True), bool):
            raise ConfigError(f"model.tower.{key}", f"must be true or false, got {tower[key]!r}")
    return SharedTower(
        block,
        num_streams=len(names),
        sharing=sharing,
        groups=groups,
        fold=tower.get("fold", True),
        use_shared=tower.get("use_shared", True),
        output_dim=embedding_dim,
        name="tower",
    )


def _head_name(cfg: Mapping[str, Any], family: str, default: str) -> str:
    head = cfg.get("head", default)
    if head not in _FAMILY_HEADS[family]:
        raise ConfigError(
            "model.head",
            f"unknown head {head!r} for family {family!r}; expected one of {_FAMILY_HEADS[family]}",
        )
    return head


def _loss(cfg: Mapping[str, Any], family: str) -> losses.PerExample:
    loss_cfg = cfg.get("loss") or _DEFAULT_LOSS[family]
    loss = losses.get_loss(loss_cfg, "model.loss")
    kind = loss_cfg if isinstance(loss_cfg, str) else loss_cfg.get("type")
    if kind not in _FAMILY_LOSSES[family]:
        raise ConfigError(
            "model.loss.type",
            f"loss {kind!r} does not fit family {family!r}; expected one of {_FAMILY_LOSSES[family]}",
        )
    return loss


def _build_two_tower(
    cfg: Mapping[str, Any], input_specs: Mapping[str, Any], embedding_dim: int
) -> tuple:
    tables_cfg = cfg.get("tables")
    if not isinstance(tables_cfg, Mapping) or not tables_cfg:
        raise ConfigError("model.tables", "two_tower needs tables: {name: {vocab_size: V}}")
    tables = {}
    for tname, tcfg in tables_cfg.items():
        path = f"model.tables.{tname}"
        if not isinstance(tcfg, Mapping):
            raise ConfigError(path, f"must be a mapping with vocab_size, got {tcfg!r}")
        _check_keys(tcfg, ("vocab_size", "dim"), path)
        vocab = _positive_int(tcfg, "vocab_size", 0, path)
        dim = _positive_int(tcfg, "dim", embedding_dim, path)
        tables[tname] = keras.layers.Embedding(vocab, dim, name=f"table_{tname}")
    sides = {}
    used: list[str] = []
    for side in ("query", "candidate"):
        path = f"model.{side}"
        scfg = cfg.get(side)
        if not isinstance(scfg, Mapping):
            raise ConfigError(path, "two_tower needs query and candidate sections with features")
        _check_keys(scfg, ("features", "combiner", "block"), path)
        features = scfg.get("features")
        if not isinstance(features, Mapping) or not features:
            raise ConfigError(f"{path}.features", "must map stream names to table names")
        dims = set()
        for stream, tname in features.items():
            if tname not in tables:
                raise ConfigError(
                    f"{path}.features.{stream}",
                    f"unknown table {tname!r}; tables are {sorted(tables)}",
                )
            if stream not in input_specs:
                raise ConfigError(
                    f"stream {stream}",
                    f"missing stream {stream!r} ({path}.features); the data has {sorted(input_specs)}",
                )
            if stream in used:
                raise ConfigError(f"{path}.features.{stream}", "a stream can feed only one tower")
            shape, dtype = _spec_shape_dtype(input_specs[stream])
            check_block_input({"type": "embedding"}, shape, dtype, f"stream {stream}")
            used.append(stream)
            dims.add(tables[tname].output_dim)
        if len(dims) > 1:
            raise ConfigError(
                f"{path}.features",
                f"tables of one tower must have one dim to be combined, got {sorted(dims)}",
            )
        combiner = scfg.get("combiner", "mean")
        if combiner not in ("sum", "mean"):
            raise ConfigError(f"{path}.combiner", f"expected sum or mean, got {combiner!r}")
        block = validate_block_spec(
            scfg.get("block", {"type": "mlp", "units": [64]}), f"{path}.block"
        )
        if block["type"] != "mlp":
            raise ConfigError(f"{path}.block.type", "a two_tower tower block must be an mlp")
        sides[side] = (dict(features), combiner, block)
    for stream in input_specs:
        if stream not in used:
            raise ConfigError(
                f"stream {stream}",
                f"extra stream {stream!r}: not a feature of model.query or model.candidate",
            )
    inputs = _inputs(used, input_specs)
    embeddings = []
    for side, (features, combiner, block) in sides.items():
        looked_up = [tables[t](inputs[s]) for s, t in features.items()]
        pooled = CombineFields(combiner, name=f"{side}_combine")(looked_up)
        embeddings.append(build_block(block, embedding_dim, name=f"{side}_tower")(pooled))
    output = heads.StackPair(name="pair")(embeddings)
    return inputs, output, used


def build_model(model_cfg: Mapping[str, Any], input_specs: Mapping[str, Any]) -> ModelSpec:
    """Build a family's functional model, per-example loss and metrics from its config."""
    if not isinstance(model_cfg, Mapping):
        raise ConfigError("model", f"must be a mapping, got {model_cfg!r}")
    family = model_cfg.get("family")
    if family not in MODEL_FAMILIES:
        raise ConfigError(
            "model.family", f"unknown family {family!r}; expected one of {MODEL_FAMILIES}"
        )
    _check_keys(model_cfg, _COMMON_KEYS + _FAMILY_KEYS[family], "model")
    embedding_dim = _positive_int(model_cfg, "embedding_dim", 32, "model")
    loss = _loss(model_cfg, family)

    if family == "two_tower":
        inputs, output, names = _build_two_tower(model_cfg, input_specs, embedding_dim)
        metrics = {
            "binary_accuracy": losses.BinaryAccuracy(),
            "in_batch_top1": losses.InBatchTop1(),
        }
    else:
        names = _family_streams(family, input_specs)
        _check_streams(names, input_specs)
        tower = _tower(model_cfg, names, input_specs, embedding_dim)
        inputs = _inputs(names, input_specs)
        outs = tower([inputs[n] for n in names])
        if family == "siamese":
            head = _head_name(model_cfg, family, "l2")
            layer = (
                heads.L2Distance(name="distance")
                if head == "l2"
                else heads.CosineSimilarity(as_distance=True, name="distance")
            )
            output = layer(outs)
            metrics = {
                "pair_accuracy": losses.PairAccuracy(threshold=getattr(loss, "margin", 1.0) / 2)
            }
        elif family == "triplet":
            _head_name(model_cfg, family, "l2")
            output = heads.TripletDistances(name="distances")(outs)
            metrics = {"triplet_accuracy": losses.TripletAccuracy()}
        else:
            head = _head_name(model_cfg, family, "concat")
            num_classes = _positive_int(model_cfg, "num_classes", 10, "model")
            combined = heads.Combine(head, name="combine")(outs)
            output = keras.layers.Dense(num_classes, dtype="float32", name="logits")(combined)
            metrics = {"accuracy": losses.ClassAccuracy()}
    model = keras.Model(inputs=inputs, outputs=output, name=f"{family}_model")
    return ModelSpec(model=model, loss=loss, metrics=metrics, stream_names=list(names))
