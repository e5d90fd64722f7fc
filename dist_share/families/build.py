"""A family's Keras model, per-example loss and metrics, built from its typed ``model`` config.

`build_model` checks the config against the data's input specs *before* creating any variable,
so a wrong stream name or shape fails with a `ConfigError` naming the stream rather than with a
shape error deep inside Keras. Everything that differs between families is asked of
the family. Call it inside ``strategy.scope()``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import keras

from dist_share.config.schema import ModelConfig
from dist_share.errors import ConfigError
from dist_share.families.base import Family, TowerFamily
from dist_share.families.registry import get_family
from dist_share.model.blocks.spec import check_block_input
from dist_share.model.heads import DecisionThreshold
from dist_share.model.losses import get_loss


@dataclasses.dataclass
class ModelSpec:
    """What the trainer needs: the model, a per-example loss and per-example metrics."""

    model: keras.Model
    loss: Callable[[Any, Any], Any]
    metrics: dict[str, Callable[[Any, Any], Any]]
    stream_names: list[str]
    # Pair distances: evaluation calibrates a threshold on them (`model.calibration`), and
    # sets this variable to it (``model.head_threshold: calibrated``) if there is one.
    calibrates: bool = False
    threshold: Any = None


def _shape_dtype(spec: Any) -> tuple[tuple, str]:
    shape = tuple(spec.shape.as_list() if hasattr(spec.shape, "as_list") else spec.shape)
    return shape, getattr(spec.dtype, "name", str(spec.dtype))


def _stream_names(
    family: Family, model_cfg: ModelConfig, input_specs: Mapping[str, Any]
) -> list[str]:
    """The family's streams, checked against the data's (multiview's count comes from the data)."""
    if not family.model_streams(model_cfg):
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
    else:
        names = list(family.model_streams(model_cfg))
    for name in names:
        if name not in input_specs:
            raise ConfigError(
                f"stream {name}",
                f"missing stream {name!r}: the model needs {names}, the data has {sorted(input_specs)}",
            )
    for name in input_specs:
        if name not in names:
            raise ConfigError(
                f"stream {name}",
                f"extra stream {name!r} that the model does not use (it uses {names})",
            )
    return names


def _check_inputs(model_cfg: ModelConfig, names: list[str], input_specs: Mapping) -> None:
    """Each stream can feed the block it goes through; streams sharing weights agree in shape."""
    family = get_family(model_cfg.family)
    shapes = {}
    for name in names:
        shape, dtype = _shape_dtype(input_specs[name])
        block = model_cfg.tower.block if isinstance(family, TowerFamily) else {"type": "embedding"}
        check_block_input(block, shape, dtype, f"stream {name}")
        shapes[name] = shape
    if not isinstance(family, TowerFamily):
        return
    tower = model_cfg.tower
    if tower.sharing == "grouped":
        sets = [[names[i] for i in g] for g in tower.groups if all(i < len(names) for i in g)]
    elif tower.sharing in ("shared", "switchable"):
        sets = [names]
    else:
        sets = []
    for members in sets:
        first = members[0]
        for other in members[1:]:
            if shapes[other] != shapes[first]:
                raise ConfigError(
                    f"stream {other}",
                    f"shape {list(shapes[other])} differs from stream {first!r} "
                    f"{list(shapes[first])}, but they share weights "
                    f"(model.tower.sharing: {tower.sharing})",
                )


def build_model(model_cfg: ModelConfig, input_specs: Mapping[str, Any]) -> ModelSpec:
    """Build a family's functional model, per-example loss and metrics.

    Args:
        model_cfg: the ``model`` section, from `run.resolve.validate` or `run.resolve.parse_model`.
        input_specs: per-example ``tf.TensorSpec`` of every stream (`run.inputs.input_specs`).

    Raises:
        ConfigError: a stream is missing, extra, or of a shape/dtype its block cannot take
            (the path names the stream), or the tower groups do not partition the streams.
    """
    family = get_family(model_cfg.family)
    names = _stream_names(family, model_cfg, input_specs)
    _check_inputs(model_cfg, names, input_specs)
    inputs = {}
    for name in names:
        shape, dtype = _shape_dtype(input_specs[name])
        inputs[name] = keras.Input(shape=shape, dtype=dtype, name=name)
    loss = get_loss(model_cfg.loss, "model.loss")
    output, metrics = family.build_output(model_cfg, inputs, loss)
    model = keras.Model(inputs=inputs, outputs=output, name=f"{family.name}_model")
    decision = [layer for layer in model.layers if isinstance(layer, DecisionThreshold)]
    return ModelSpec(
        model=model,
        loss=loss,
        metrics=metrics,
        stream_names=list(names),
        calibrates=family.calibrates(model_cfg),
        threshold=decision[0].threshold if decision else None,
    )
