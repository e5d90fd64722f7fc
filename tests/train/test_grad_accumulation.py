"""Micro-batches give the result of one batch: ``training.grad_accum_steps: 2`` with the in-batch
softmax (GradCache) ends where one batch of twice the micro-batch ends, step by step, locally and
on 2 replicas (mirrored, horovodrun); models whose training forward cannot be replayed are
refused."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.errors import ConfigError
from dist_share.train.loops import accumulate
from dist_share.train.trainer import Trainer
from tests.helpers import train_jobs
from tests.helpers.runs import max_diff, metrics
from tests.workers import train_common as tc

STRATEGY = get_strategy(StrategyConfig(name="local"))
TOL = 1e-5
MODEL = "two_tower_ibs"  # the shipped two-tower config with in_batch_softmax (train_common)


def _config(accum: int, steps: int = 4):
    return tc.run_config(
        optimizer={"name": "sgd", "learning_rate": 0.5},
        training={
            "steps": steps,
            "batch_size": 16,
            "grad_accum_steps": accum,
            "log_every": 1,
            "eval_every": 0,
            "deterministic": True,
            "seed": 3,
        },
        checkpoint={"every": 0},
        logging={"progress_bar": False, "tensorboard": False},
    )


def _train(accum: int, run_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(initial variables, final variables, the train records of each step)."""
    trainer = Trainer(tc.BUILDERS[MODEL], STRATEGY, _config(accum), run_dir)
    initial = {v.path: v.numpy().copy() for v in trainer.model.weights}
    trainer.train(tc.make_dataset_fn(MODEL, 16))
    trainer.close()
    final = {v.path: v.numpy() for v in trainer.model.weights}
    return initial, final, metrics(run_dir, "train")


def test_two_micro_batches_equal_one_batch_step_by_step(tmp_path: Path, monkeypatch) -> None:
    initial, one, one_logs = _train(1, tmp_path / "one")
    assert max_diff(one, initial) > 100 * TOL, "training must move the variables"
    _, two, two_logs = _train(2, tmp_path / "two")
    assert max_diff(two, one) < TOL
    assert [r["step"] for r in two_logs] == [1, 2, 3, 4]
    for a, b in zip(one_logs, two_logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=TOL), a["step"]
        # The metric ranks among the whole batch's candidates too, not a micro-batch's.
        assert b["in_batch_top1"] == a["in_batch_top1"], a["step"]
    # The comparison can fail: each micro-batch as its own in-batch softmax (half the
    # negatives) is another objective.
    monkeypatch.setattr(accumulate, "couples_rows", lambda fn: False)
    _, apart, apart_logs = _train(2, tmp_path / "apart")
    assert abs(apart_logs[0]["loss"] - one_logs[0]["loss"]) > 1e-2
    assert max_diff(apart, one) > 100 * TOL


def _pair_model(layer: keras.layers.Layer) -> tc.Spec:
    """(query, candidate) from one Embedding table, with `layer` in the query tower."""
    from dist_share.model.heads import StackPair
    from dist_share.model.losses import InBatchSoftmaxLoss

    user = keras.Input((), dtype="int32", name="user")
    history = keras.Input((3,), dtype="int32", name="history")
    item = keras.Input((), dtype="int32", name="item")
    table = keras.layers.Embedding(tc.VOCAB, 4, name="table")
    query = layer(keras.layers.Dense(4, name="query_proj")(table(user)))
    candidate = keras.layers.GlobalAveragePooling1D()(table(history)) + table(item)
    model = keras.Model(
        {"user": user, "history": history, "item": item}, StackPair(name="pair")([query, candidate])
    )
    return tc.Spec(model, InBatchSoftmaxLoss(), {}, tc.STREAMS["two_tower"])


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (lambda: keras.layers.Dropout(0.1, name="drop"), "draws random numbers"),
        (lambda: keras.layers.BatchNormalization(name="bn"), "batch statistics"),
    ],
    ids=["dropout", "batch_norm"],
)
def test_a_forward_that_cannot_be_replayed_is_refused(layer, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as e:
        Trainer(lambda: _pair_model(layer()), STRATEGY, _config(2), None)
    assert e.value.path == "training.grad_accum_steps"
    assert "GradCache" in str(e.value)
    # One forward per micro-batch is fine: nothing is replayed.
    Trainer(lambda: _pair_model(layer()), STRATEGY, _config(1), None)
    # A frozen batch norm normalises with its moving statistics: replayable.
    frozen = keras.layers.BatchNormalization(name="bn")
    frozen.trainable = False
    Trainer(lambda: _pair_model(frozen), STRATEGY, _config(2), None)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", [MODEL, "two_tower_corrected"])
@pytest.mark.parametrize("launcher", ["local", "mirrored", "horovod_gloo"])
def test_two_micro_batches_per_replica_equal_one_batch(launcher: str, model: str) -> None:
    """2 micro-batches per replica (2 replicas of 4 rows under mirrored and horovodrun): the
    variables, last loss and eval of one batch on one replica. With logQ correction, the
    frequency estimate (a weight of the model) counts each step once, however it is split."""
    ref = train_jobs.run("local")[0]["runs"][model]
    for rank, result in train_jobs.run(launcher).items():
        runs = result["runs"]
        accum = runs[f"{model}_accum"]
        assert accum["step"] == 5
        assert max_diff(accum["variables"], ref["variables"]) < TOL, (launcher, rank)
        assert accum["last_logs"]["loss"] == pytest.approx(ref["last_logs"]["loss"], abs=TOL)
        assert accum["eval"] and set(accum["eval"]) == set(ref["eval"])
