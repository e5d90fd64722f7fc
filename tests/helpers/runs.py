"""What a run directory holds, read back for the tests: its metrics and its checkpointed
variables, and how far two sets of variables lie apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of the run's metrics.jsonl in order; only ``split``'s ("train", "eval") if
    given."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return records if split is None else [r for r in records if r.get("split") == split]


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two {name: array} sets with the same names."""
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


def checkpoint_variables(run_dir: str | Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, model variables) of a run directory's newest checkpoint, as the trainer saved it."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run_dir) + "/checkpoints")
    assert path, f"no checkpoint in {run_dir}/checkpoints"
    reader = tf.train.load_checkpoint(path)
    names = reader.get_variable_to_shape_map()
    model = {k: reader.get_tensor(k) for k in names if k.startswith("model_variables/")}
    assert model, f"{path} holds no model variables: {sorted(names)[:10]}"
    return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")), model
