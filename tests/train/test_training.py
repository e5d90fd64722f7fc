"""The custom-loop Trainer: logs, evaluation, checkpoints, crash-and-resume, input checks."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.ops import iterator_ops

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.errors import ConfigError, DataError
from dist_share.train.trainer import Trainer
from tests.helpers import processes, train_jobs
from tests.helpers.paths import ROOT
from tests.helpers.runs import metrics
from tests.workers import train_common as tc

STRATEGY = get_strategy(StrategyConfig(name="local"))


def config(optimizer: dict | None = None, **training):
    return tc.run_config(
        optimizer=optimizer or {"name": "sgd", "learning_rate": 0.05},
        training={"steps": 4, "batch_size": 8, "log_every": 2, "eval_every": 2, **training},
        checkpoint={"every": 2, "keep": 2},
        logging={"progress_bar": False},
    )


def _live_input_iterators() -> int:
    gc.collect()
    return sum(isinstance(o, iterator_ops.OwnedIterator) for o in gc.get_objects())


def test_logs_eval_tensorboard_and_resume(tmp_path: Path) -> None:
    trainer = Trainer(tc.build_two_tower, STRATEGY, config(), tmp_path)
    data = tc.make_dataset_fn("two_tower", 8)
    iterators = _live_input_iterators()
    result = trainer.train(data, tc.make_dataset_fn("two_tower", 8, drop_remainder=False))
    # The input iterator is freed when train returns, not left to Python's exit, where tf.data
    # can wait up to 60 s for its autotuning thread (CustomLoop.release_input).
    assert _live_input_iterators() == iterators
    trainer.close()
    records = metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(r["comm_bytes_per_step"] > 0 and np.isfinite(r["loss"]) for r in train)
    assert result["loss"] == pytest.approx(evals[-1]["loss"])
    assert any((tmp_path / "tensorboard").iterdir())
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")

    # A second trainer on the same run dir resumes at step 4 and trains to 6.
    again = Trainer(tc.build_two_tower, STRATEGY, config(steps=6), tmp_path)
    again.train(data)
    again.close()
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps[-1] == 6 and 5 not in steps[:-1] and int(again.global_step.numpy()) == 6


def test_batch_and_stream_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        Trainer(tc.build_shared, STRATEGY, config(grad_accum_steps=3), None)
    assert e.value.path == "training.grad_accum_steps"
    with pytest.raises(ConfigError) as e:
        config(optimizer={"name": "lion"})
    assert e.value.path == "optimizer.name"
    trainer = Trainer(tc.build_shared, STRATEGY, config(), None)
    with pytest.raises(DataError, match=r"missing \['a', 'b', 'c'\]"):
        trainer.train(tc.make_dataset_fn("two_tower", 8))


def test_mixed_precision_trains(tmp_path: Path) -> None:
    try:
        trainer = Trainer(tc.build_shared, STRATEGY, config(mixed_precision=True, steps=2), None)
        trainer.train(tc.make_dataset_fn("shared", 8))
        assert np.isfinite(trainer.last_logs["loss"])
        assert trainer.model.get_layer("shared").compute_dtype == "float16"
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["mirrored", "horovod_gloo", "multiworker"])
def test_resume_under_every_strategy(launcher: str) -> None:
    """3 steps and a checkpoint, then a new trainer on the same run dir: it starts at step 3 on
    every rank (chief wrote, everyone restored, Horovod broadcast) at the right data position,
    and ends where an uninterrupted 5-step run ends."""
    for rank, result in train_jobs.run(launcher).items():
        resumed, plain = result["runs"]["shared_resume"], result["runs"]["shared"]
        assert resumed["start_step"] == 3 and resumed["step"] == 5, rank
        for k, v in plain["variables"].items():
            np.testing.assert_allclose(resumed["variables"][k], v, atol=1e-6)
        copies = resumed["replica_checksums"]
        assert all(c == copies[0] for c in copies)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["mirrored", "horovod_gloo", "horovod_mpirun", "multiworker"])
def test_evaluation_covers_the_split_once_everywhere(launcher: str) -> None:
    """Sharded evaluation with partial last batches (uneven step counts are fine for Horovod,
    which reduces once at the end) gives the single-device mean over the whole split."""
    ref = train_jobs.run("local")[0]["runs"]
    for result in train_jobs.run(launcher).values():
        for family in ("shared", "two_tower"):
            got, want = result["runs"][family]["eval"], ref[family]["eval"]
            assert set(got) == set(want) and want
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5), (launcher, family, k)


def test_lr_scaling_and_clipping(tmp_path: Path) -> None:
    from dist_share.config.schema import OptimizerConfig
    from dist_share.train.optimizer import make_optimizer

    opt = make_optimizer(OptimizerConfig("sgd", 0.1, scale_lr_by_world_size=True), 4)
    assert float(opt.learning_rate) == pytest.approx(0.4)
    assert float(make_optimizer(OptimizerConfig("sgd", 0.1), 4).learning_rate) == pytest.approx(0.1)
    # clipnorm bounds each variable's step by lr * clipnorm (the reduced gradient is clipped).
    cfg = config({"name": "sgd", "learning_rate": 1.0, "clipnorm": 1e-3}, steps=1)
    trainer = Trainer(tc.build_shared, STRATEGY, cfg, None)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    trainer.train(tc.make_dataset_fn("shared", 8))
    for b, v in zip(before, trainer.model.trainable_variables, strict=True):
        step = float(np.linalg.norm(v.numpy() - b))
        assert 0 < step <= 1e-3 * (1 + 1e-4)


def _checkpoint_count(run_dir: Path) -> int:
    state = run_dir / "checkpoints" / "checkpoint"
    if not state.exists():
        return 0
    return state.read_text().count("all_model_checkpoint_paths")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("run", ["shared", "two_tower_corrected"])
def test_sigkill_then_resume_ends_like_uninterrupted_run(tmp_path: Path, run: str) -> None:
    """SIGKILL mid-run, damage the newest checkpoint as a torn write would, restart: the run
    resumes from the older checkpoint, at the right data position, and ends bit-for-bit close to
    a run that was never interrupted. The logQ frequency estimate (two_tower_corrected) is
    restored and continued exactly."""
    args = ["--strategy", "local", "--runs", run, "--steps", "12", "--ckpt-every", "3"]
    killed_dir = tmp_path / "killed"
    cmd = [*train_jobs.WORKER, *args, "--run-dir", str(killed_dir), "--out", str(tmp_path / "k")]
    processes.kill_when(
        [*cmd, "--step-delay", "0.5"], lambda: _checkpoint_count(killed_dir) >= 2, 300
    )
    assert not (tmp_path / "k.rank0.json").exists()

    state = tf.train.get_checkpoint_state(str(killed_dir / "checkpoints"))
    newest = state.all_model_checkpoint_paths[-1]
    for data in Path(newest).parent.glob(Path(newest).name + ".data-*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    processes.run_job(cmd, 300, cwd=ROOT).check()

    resumed = json.loads((tmp_path / "k.rank0.json").read_text())["runs"][run]
    # The same 12 steps never interrupted: the session's shared local launch trains them
    # (run "<run>_12" of tests/workers/train_worker.py, same config but for the run dir).
    reference = train_jobs.run("local")[0]["runs"][f"{run}_12"]
    assert reference["step"] == 12 and reference["start_step"] == 0
    assert resumed["step"] == 12
    for k, v in reference["variables"].items():
        np.testing.assert_allclose(resumed["variables"][k], v, atol=1e-6)
    estimate = [k for k in reference["variables"] if k.startswith("candidate_frequency/")]
    assert len(estimate) == (3 if run == "two_tower_corrected" else 0)
    for k in estimate:  # counted from ids alone: equal, not close
        assert resumed["variables"][k] == reference["variables"][k], k
    assert not estimate or reference["variables"]["candidate_frequency/step"] == 12
    steps = [r["step"] for r in metrics(killed_dir, "train")]
    # The killed run logged steps past its last readable checkpoint; the resumed run dropped
    # them and logged them again, so every step is there exactly once, in order.
    assert steps == list(range(1, 13))


def test_checkpoint_holds_every_model_variable_of_list_held_layers(tmp_path: Path) -> None:
    """SharedTower keeps its weight sets in a Python list, which tf.train.Checkpoint(model=...)
    does not see; the checkpoint must still carry every weight and the batch-norm statistics."""
    from dist_share.families.build import build_model
    from dist_share.run.resolve import parse_model

    model_cfg = parse_model(
        {
            "family": "siamese",
            "embedding_dim": 4,
            "tower": {"sharing": "shared", "block": {"type": "mlp", "units": [8], "norm": "batch"}},
        }
    )
    specs = {s: tf.TensorSpec((8, 8, 1), tf.float32) for s in ("left", "right")}
    trainer = Trainer(lambda: build_model(model_cfg, specs), STRATEGY, config(steps=2), tmp_path)
    for v in trainer.model.variables:  # distinct values everywhere, statistics included
        v.assign(tf.random.normal(v.shape, seed=3))
    trainer.save()
    saved = [v.numpy() for v in trainer.model.variables]
    trainer.close()

    again = Trainer(lambda: build_model(model_cfg, specs), STRATEGY, config(steps=2), tmp_path)
    assert again.restore() == 0
    names = [v.path for v in again.model.variables]
    assert any("moving_mean" in n for n in names), names
    for name, want, got in zip(names, saved, again.model.variables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want, err_msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["local", "mirrored", "horovod_gloo", "multiworker"])
def test_steps_per_loop_ends_where_single_steps_end(launcher: str) -> None:
    """training.steps_per_loop: 3 runs 3 steps per compiled call (a loop of 3, then one cut
    short to land on the end); the variables are those of one step per call, on every rank,
    and a run resumed from the checkpoint at the loop boundary ends there too."""
    for rank, result in train_jobs.run(launcher).items():
        runs = result["runs"]
        for name in ("shared_k3", "shared_k3_resume"):
            if name not in runs:
                continue
            assert runs[name]["step"] == 5, (launcher, name)
            for k, v in runs["shared"]["variables"].items():
                np.testing.assert_allclose(
                    runs[name]["variables"][k], v, atol=1e-6, err_msg=f"{launcher} {rank} {name}"
                )
        if "shared_k3_resume" in runs:
            assert runs["shared_k3_resume"]["start_step"] == 3


def test_steps_per_loop_lands_on_every_log_eval_and_checkpoint(tmp_path: Path) -> None:
    """A loop is cut short at each logging, evaluation and checkpoint step, so nothing that
    happens between loops moves when steps_per_loop grows."""
    cfg = config(steps=7, steps_per_loop=4, log_every=3, eval_every=5)
    trainer = Trainer(tc.build_shared, STRATEGY, cfg, tmp_path)
    trainer.train(tc.make_dataset_fn("shared", 8), tc.make_dataset_fn("shared", 8, False))
    trainer.close()
    records = metrics(tmp_path)
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 3),
        ("eval", 5),
        ("train", 6),
        ("train", 7),
        ("eval", 7),
    ]
    saved = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    # checkpoint.every 2 (keep 2): saved at 2, 4, 6 and the final 7; the last two are kept.
    assert [p.rsplit("-", 1)[1] for p in saved.all_model_checkpoint_paths] == ["6", "7"]


def test_logs_are_plain_lines_off_a_terminal_and_strict_json(tmp_path: Path) -> None:
    """A Slurm output file or `kubectl logs` gets one line per logging interval, not progress
    bar frames; metrics.jsonl stays strict JSON whatever the values (NaN -> null)."""
    import io

    from dist_share.train.logs import MetricsLogger

    console = io.StringIO()
    logger = MetricsLogger(tmp_path, True, 100, tensorboard=False, stream=console, rank=1)
    logger.open(0)
    for step in range(1, 101):
        logger.show_progress(step, {"loss": 0.25}, interval_end=step % 50 == 0)
    logger.log("train", 50, {"loss": float("nan"), "accuracy": float("inf"), "ok": 1.0})
    logger.close()
    lines = console.getvalue().splitlines()
    assert "\r" not in console.getvalue() and len(lines) == 2
    assert lines[0].startswith("[rank 1] step 50/100 loss=0.25 eta=")

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=reject)
    assert record["loss"] is None and record["accuracy"] is None and record["ok"] == 1.0
