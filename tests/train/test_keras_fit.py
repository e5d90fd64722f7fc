"""Keras 3 `model.fit` gives the custom loop's result under every strategy, Horovod included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.errors import ConfigError
from dist_share.train.trainer import Trainer
from tests.helpers import train_jobs
from tests.helpers.runs import max_diff, metrics
from tests.workers import train_common as tc

STRATEGY = get_strategy(StrategyConfig(name="local"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_fit_under_horovod_matches_custom_loop() -> None:
    """2 processes under horovodrun: fit's allreduce (our optimizer hook, not Horovod's Keras
    DistributedOptimizer, which fails on Keras 3 variables) and the broadcast of the initial
    state give the custom loop's variables on both ranks, for dense and sparse gradients."""
    results = train_jobs.run("horovod_gloo")
    for family in ("shared", "two_tower"):
        custom = results[0]["runs"][family]
        assert max_diff(custom["variables"], custom["initial"]) > 1e-3
        for rank in (0, 1):
            fit = results[rank]["runs"][f"{family}_fit"]
            assert fit["step"] == 5
            assert max_diff(fit["variables"], custom["variables"]) < 1e-5, (family, rank)
        # Logs are averaged over ranks, so both ranks report the same loss.
        losses = [results[r]["runs"][f"{family}_fit"]["last_logs"]["loss"] for r in (0, 1)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        # Chief-only callbacks ran on rank 0 only, and saw the rank-averaged logs.
        chief = results[0]["runs"][f"{family}_fit"]["chief_callback_logs"]
        assert len(chief) == 1 and chief[0]["loss"] == pytest.approx(losses[0], rel=1e-6)
        assert results[1]["runs"][f"{family}_fit"]["chief_callback_logs"] == []


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher", ["local", "mirrored", "multiworker"])
def test_fit_under_tf_distribute_matches_custom_loop(launcher: str) -> None:
    runs = train_jobs.run(launcher)[0]["runs"]
    assert max_diff(runs["shared_fit"]["variables"], runs["shared"]["variables"]) < 1e-5


def test_fit_logs_checkpoints_and_evaluates(tmp_path: Path) -> None:
    cfg = tc.run_config(
        optimizer={"name": "adam", "learning_rate": 0.01},
        training={
            "steps": 4,
            "batch_size": 8,
            "loop": "keras_fit",
            "log_every": 2,
            "eval_every": 2,
        },
        checkpoint={"every": 2, "keep": 2},
        logging={"progress_bar": False, "tensorboard": False},
    )
    trainer = Trainer(tc.build_shared, STRATEGY, cfg, tmp_path)
    result = trainer.train(
        tc.make_dataset_fn("shared", 8), tc.make_dataset_fn("shared", 8, drop_remainder=False)
    )
    trainer.close()
    assert set(result) == {"loss", "mae"} and np.isfinite(result["loss"])
    records = metrics(tmp_path)
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 2),
        ("eval", 2),
        ("train", 4),
        ("eval", 4),
    ]
    assert result["loss"] == records[-1]["loss"]
    assert (tmp_path / "checkpoints" / "ckpt-4.index").exists()
    assert int(trainer.optimizer.iterations.numpy()) == 4


def test_fit_rejects_grad_accumulation() -> None:
    cfg = tc.run_config(
        training={"steps": 1, "batch_size": 8, "loop": "keras_fit", "grad_accum_steps": 2}
    )
    with pytest.raises(ConfigError) as e:
        Trainer(tc.build_shared, STRATEGY, cfg, None)
    assert e.value.path == "training.grad_accum_steps"
