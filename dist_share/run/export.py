"""Exports of a run: the whole model, or one tower alone, as a SavedModel and a ``.keras`` file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dist_share import files
from dist_share.run.restored import ONE_PROCESS, RestoredRun
from dist_share.run.writes import write_or_explain

# The full model's predictions reload within this of the trained model's; a tower's within
# TOWER_TOLERANCE of the full model's embedding of it.
MODEL_TOLERANCE = 1e-4
TOWER_TOLERANCE = 1e-6
CUSTOM_LAYERS = "dist_share.model.towers, dist_share.model.heads, dist_share.model.sampling"


def _kept(path: Path, what: str) -> str:
    return f"the previous {what} there is intact" if path.exists() else f"no {what} existed there"


def _max_diff(outputs: list[Any], expected: np.ndarray) -> float:
    return max(float(np.max(np.abs(np.asarray(o) - expected))) for o in outputs)


def _reloaded(path: Path, features: Mapping[str, Any]) -> list[Any]:
    """The predictions of both saved formats, reloaded from ``path``."""
    loaded = tf.saved_model.load(str(path / "saved_model"))  # kept alive: owns the variables
    served = loaded.serve(dict(features))
    reloaded = keras.models.load_model(str(path / "model.keras"))(dict(features), training=False)
    return [served, reloaded]


def _save(model: keras.Model, path: Path) -> None:
    model.export(str(path / "saved_model"), verbose=False)
    model.save(str(path / "model.keras"))


def export_model(run_dir: Path) -> str:
    """The whole model at the newest checkpoint to ``RUN/export``; returns what was done."""
    restored = RestoredRun(run_dir, "export", ONE_PROCESS)
    model = restored.trainer.model
    features, _ = next(iter(restored.run.inputs.eval_fn(None)))
    expected = np.asarray(model(features, training=False))
    out = run_dir / "export"
    diff = 0.0

    def write() -> None:
        nonlocal diff
        with files.atomic_directory(out) as tmp:
            _save(model, tmp)
            diff = _max_diff(_reloaded(tmp, features), expected)
            if not diff <= MODEL_TOLERANCE:
                raise RuntimeError(f"exported model disagrees with the trained one ({diff})")
            files.atomic_write_text(tmp / "README.txt", _model_readme(restored, diff))

    write_or_explain(f"the export of step {restored.step}", out, _kept(out, "export"), write)
    restored.close()
    return (
        f"exported step {restored.step} to {out} (saved_model/, model.keras); "
        f"reloaded predictions match (max abs diff {diff:.2e})"
    )


def _inputs_text(specs: Mapping[str, Any]) -> str:
    return "\n".join(
        f"  {k}: {v.dtype.name} {[None, *v.shape.as_list()]}" for k, v in specs.items()
    )


def _model_readme(restored: RestoredRun, diff: float) -> str:
    return (
        f"dist_share export of a {restored.cfg.model.family} model at step {restored.step}.\n"
        f"saved_model/: tf.saved_model.load(path).serve(inputs_dict)\n"
        f"model.keras:  keras.models.load_model(path) after `import {CUSTOM_LAYERS}`\n"
        f"inputs (a dict):\n{_inputs_text(restored.run.inputs.specs)}\n"
        f"round-trip check: max abs difference {diff:.2e}\n" + _threshold_line(restored)
    )


def _threshold_line(restored: RestoredRun) -> str:
    threshold = restored.trainer.state.spec.threshold
    if threshold is None:
        return ""
    return (
        f"decision threshold (layer decision_threshold, calibrated on the eval pairs): "
        f"same when the distance is below {float(threshold.numpy()):.6g}\n"
    )


def tower_export_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "towers" / name


def export_tower(run_dir: Path, name: str, out: Path | None = None) -> str:
    """Tower ``name`` alone at the newest checkpoint to ``out`` (default ``RUN/towers/NAME``):
    its streams in, its embedding out, checked on reload against the full model's embedding."""
    restored = RestoredRun(run_dir, "export", ONE_PROCESS)
    tower = restored.tower(name)
    features, _ = next(iter(restored.run.inputs.eval_fn(None)))
    expected = np.asarray(tower.reference(features))
    own = {s: features[s] for s in tower.streams}
    out = out or tower_export_dir(run_dir, name)
    diff = 0.0

    def write() -> None:
        nonlocal diff
        with files.atomic_directory(out) as tmp:
            _save(tower.model, tmp)
            diff = _max_diff(_reloaded(tmp, own), expected)
            if not diff <= TOWER_TOLERANCE:
                raise RuntimeError(
                    f"the exported {name} tower disagrees with the full model's embedding "
                    f"(max abs diff {diff:.2e} > {TOWER_TOLERANCE})"
                )
            description = tower_description(restored, tower, diff)
            files.atomic_write_text(tmp / "tower.json", json.dumps(description, indent=2) + "\n")

    write_or_explain(f"the {name} tower of step {restored.step}", out, _kept(out, "export"), write)
    restored.close()
    dim = tower.model.output.shape[-1]
    return (
        f"exported the {name} tower of step {restored.step} to {out} (saved_model/, "
        f"model.keras, tower.json): inputs {list(tower.streams)}, {dim}-dimensional embeddings "
        f"({tower.similarity}); reloaded embeddings match the full model's "
        f"(max abs diff {diff:.2e})"
    )


def tower_description(restored: RestoredRun, tower: Any, diff: float | None = None) -> dict:
    """What a tower export or an embedding manifest says about the tower."""
    specs = restored.run.inputs.specs
    out = {
        "family": restored.cfg.model.family,
        "tower": tower.name,
        "step": restored.step,
        "inputs": {
            s: {"dtype": specs[s].dtype.name, "shape": [None, *specs[s].shape.as_list()]}
            for s in tower.streams
        },
        "dimension": int(tower.model.output.shape[-1]),
        "similarity": tower.similarity,
        "custom_layers": CUSTOM_LAYERS,
    }
    threshold = restored.trainer.state.spec.threshold
    if threshold is not None:
        # The pair threshold calibrated by the evaluation before the checkpoint.
        out["decision_threshold"] = float(threshold.numpy())
    if diff is not None:
        out["round_trip_max_abs_diff"] = diff
    return out
