"""TensorBoard is installed by the set-up and shows what a run logs: every value of
metrics.jsonl as a scalar at its step (read back with TensorBoard's own event reader), the
config as HParams, the step's graph, a profiler window's trace, and a real TensorBoard serving
it all to a real browser."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers.paths import CONFIGS, EXE
from tests.helpers.runs import metrics
from tests.integration.test_cli import dist_share


def test_the_tensorboard_command_is_installed() -> None:
    tensorboard = Path(EXE).with_name("tensorboard")
    out = subprocess.run([str(tensorboard), "--version_tb"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("2.21"), out.stderr


# One short run for the tests below: logs every step, evaluates at 3 and 6, and profiles
# steps 3 and 4.
SETTINGS = {
    "training.steps": 6, "training.log_every": 1, "training.eval_every": 3,
    "training.batch_size": 16, "data.train_examples": 256, "data.eval_examples": 64,
    "training.profile.start_step": 2, "training.profile.steps": 2,
    "logging.tensorboard": "true", "logging.progress_bar": "false",
}  # fmt: skip
# The signals every train record carries beside the loss and the family's metrics.
TRAIN_SIGNALS = (
    "examples_per_sec", "step_time", "learning_rate", "grad_norm", "comm_bytes_per_step",
    "nonfinite_skipped",
)  # fmt: skip


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of runs holding one run, ``digits``, made by ``dist-share train``."""
    root = tmp_path_factory.mktemp("runs")
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    config = str(CONFIGS / "siamese_digits.yaml")
    done = dist_share("train", config, "--run-dir", str(root / "digits"), *sets, timeout=300)
    assert done.returncode == 0, done.stderr
    return root


def _events(run: Path) -> tuple[Any, dict[str, dict[int, float]]]:
    """TensorBoard's own reader on the run's events, and every scalar by tag and step."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(
        str(run / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    reader.Reload()
    scalars = reader.PluginTagToContent("scalars")
    events = {
        tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in reader.Tensors(tag)}
        for tag in scalars
    }
    return reader, events


@pytest.mark.timeout(300)
def test_every_logged_value_is_a_tensorboard_scalar_at_its_step(logdir: Path) -> None:
    run = logdir / "digits"
    _, events = _events(run)
    records = metrics(run)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
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
    # The signals of a run, at every logged step, with the values they must have here.
    for name in ("loss", *TRAIN_SIGNALS):
        assert sorted(events[f"train/{name}"]) == [1, 2, 3, 4, 5, 6], name
    for name in ("loss", "pair_accuracy", "roc_auc", "seconds", "examples_per_sec"):
        assert sorted(events[f"eval/{name}"]) == [3, 6], name
    train = metrics(run, "train")
    assert [r["learning_rate"] for r in train] == pytest.approx([0.002] * 6)  # the config's
    assert all(r["grad_norm"] > 0 and r["nonfinite_skipped"] == 0 for r in train)
    assert all(r["examples_per_sec"] == pytest.approx(16 / r["step_time"]) for r in train)
    assert not [t for t in events if "rank_step_time" in t]  # one process: no per-rank times


def test_the_run_shows_its_config_as_hparams_and_its_step_as_a_graph(logdir: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    reader, _ = _events(logdir / "digits")
    (content,) = reader.PluginTagToContent("hparams").values()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = yaml.safe_load((logdir / "digits" / "config.yaml").read_text())
    assert hparams["model.family"].string_value == config["model"]["family"] == "siamese"
    assert hparams["training.batch_size"].number_value == 16
    assert hparams["training.profile.steps"].number_value == 2
    assert hparams["strategy.sparse.dedup"].bool_value is True
    assert hparams["model.tower.block.filters"].string_value == "[16, 32]"
    ops = {node.op for node in reader.Graph().node}
    assert {"Conv2D", "IteratorGetNext"} <= ops  # the compiled train step, data to update


def test_the_profiler_traces_only_the_asked_steps(logdir: Path) -> None:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (trace,) = (logdir / "digits" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb")
    space = xplane_pb2.XSpace.FromString(trace.read_bytes())
    steps = []
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        stats = {k: v.name for k, v in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                if names.get(event.metadata_id) == "train":
                    values = {stats[s.metadata_id]: s.int64_value for s in event.stats}
                    steps.append(values["step_num"])
    assert sorted(steps) == [3, 4]  # training.profile: start_step 2, steps 2


def test_a_profiler_window_past_the_end_is_one_line_naming_the_key(tmp_path: Path) -> None:
    done = dist_share(
        "train", str(CONFIGS / "siamese_digits.yaml"), "--run-dir", str(tmp_path / "run"),
        "--set", "training.steps=10", "--set", "training.profile={start_step: 8, steps: 5}",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dist-share train: error: training.profile.steps: the window ends at step 13, past "
        "the end of the run (training.steps is 10)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(240)
def test_a_real_tensorboard_shows_a_run_in_a_real_browser(logdir: Path, tmp_path: Path) -> None:
    """``tensorboard --logdir`` on a loopback port serves a short run's loss series, equal to
    metrics.jsonl's, and its scalars dashboard (Time Series) draws them in headless Chromium:
    the screenshot is not blank, the page lists the run. Nothing is left running after."""
    from PIL import Image

    from tests.helpers import tensorboard

    run = logdir / "digits"
    expected = {split: metrics(run, split) for split in ("train", "eval")}
    assert [r["step"] for r in expected["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in expected["eval"]] == [3, 6]
    name = (run / "tensorboard").relative_to(logdir).as_posix()  # TensorBoard's run name
    screenshot = tmp_path / "scalars.png"

    with tensorboard.serve(logdir) as server:
        # Its data server loads the event files in the background: ask until all are there.
        deadline = time.monotonic() + 60
        while True:
            tags = tensorboard.api(server, "/data/plugin/scalars/tags")
            series = {
                split: tensorboard.api(server, "/data/plugin/scalars/scalars", run=name,
                                       tag=f"{split}/loss") if name in tags else []
                for split in expected
            }  # fmt: skip
            if all(len(series[s]) == len(expected[s]) for s in expected):
                break
            assert time.monotonic() < deadline, (tags, series)
            time.sleep(0.5)
        assert tensorboard.api(server, "/data/runs") == [name]
        assert {"train/loss", "eval/loss", "eval/roc_auc"} <= tags[name].keys()
        for split, records in expected.items():
            assert [step for _, step, _ in series[split]] == [r["step"] for r in records]
            assert [np.float32(v) for _, _, v in series[split]] == [
                np.float32(r["loss"]) for r in records
            ], split

        # The dashboard filtered to train/loss, charts as SVG (so the DOM holds the line): ready
        # once the card's line has a vertex per step.
        page = tensorboard.render(
            f"{server.url}/?forceSVG=true&tagFilter=train%2Floss#timeseries",
            screenshot,
            ready="[...document.querySelectorAll('card-view')].some(card =>"
            " card.querySelector('[title=\"train/loss\"]') &&"
            " [...card.querySelectorAll('line-chart path')].some(p =>"
            f" (p.getAttribute('d') || '').split('L').length === {len(expected['train'])}))",
        )
        runs_list = page.dom[page.dom.index("<runs-selector") : page.dom.index("</runs-selector>")]
        assert re.search(rf">\s*{re.escape(name)}\s*<", runs_list), runs_list[-3000:]

    with Image.open(screenshot) as image:
        assert image.size == (1280, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    background_share = max(colours)[0] / (1280 * 900)
    assert len(colours) > 100 and background_share < 0.9, (len(colours), background_share)

    # Nothing is left running: not TensorBoard nor its data server, not Chromium's processes
    # nor its crash handlers (they leave its process group).
    assert not tensorboard.live_processes(server.pid)
    assert not tensorboard.live_processes(page.pid)
    assert not tensorboard.live_processes(mentioning=page.home)
