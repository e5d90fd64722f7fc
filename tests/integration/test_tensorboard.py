"""TensorBoard is installed by the set-up and reads what a run logs: every value of
metrics.jsonl is a scalar event at its step, read back with TensorBoard's own event reader."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import CONFIGS, EXE
from tests.helpers.runs import metrics
from tests.integration.test_cli import dist_share


def test_the_tensorboard_command_is_installed() -> None:
    tensorboard = Path(EXE).with_name("tensorboard")
    out = subprocess.run([str(tensorboard), "--version_tb"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("2.21"), out.stderr


@pytest.mark.timeout(300)
def test_every_logged_value_is_a_tensorboard_scalar_at_its_step(tmp_path: Path) -> None:
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    run = tmp_path / "run"
    settings = {
        "training.steps": 4, "training.log_every": 1, "training.eval_every": 2,
        "training.batch_size": 16, "data.train_examples": 256, "data.eval_examples": 64,
        "logging.tensorboard": "true", "logging.progress_bar": "false",
    }  # fmt: skip
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    done = dist_share("train", str(CONFIGS / "siamese_digits.yaml"), "--run-dir", str(run), *sets)
    assert done.returncode == 0, done.stderr

    reader = event_accumulator.EventAccumulator(
        str(run / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    reader.Reload()
    events = {
        tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in reader.Tensors(tag)}
        for tag in reader.Tags()["tensors"]
    }
    records = metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
    expected = {
        (f"{r['split']}/{k}", r["step"]): v
        for r in records
        for k, v in r.items()
        if k not in ("split", "step", "time")
    }
    found = {(tag, step): v for tag, steps in events.items() for step, v in steps.items()}
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert np.float32(found[key]) == np.float32(value), key
    for tag in ("train/loss", "train/examples_per_sec", "eval/pair_accuracy", "eval/roc_auc"):
        assert tag in events, sorted(events)
