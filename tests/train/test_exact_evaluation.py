"""``dist-share evaluate`` gives one checkpoint the same metrics under every strategy, batch-coupled
ones included (the two-tower config's in-batch softmax loss and in-batch top-1), when the eval
set does not divide by the global batch: a partial last batch that some replicas do not reach."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import EXE, ROOT
from tests.helpers.processes import local_horovodrun_command, run_job

# Global batch 200 over 1001 examples: locally 5 full batches and one of 1 row. Mirrored x2
# (one input pipeline, 100 rows per replica): the 6th step gives 1 row to replica 0 and none to
# replica 1. horovodrun x2 (examples dealt alternately): 501 and 500 rows, so rank 0 runs 6
# steps and rank 1 has only 5 batches. A barely trained model and popular items give tied
# candidates in a batch of 200, which the replicas gather in another order than one process.
EVAL_ARGS = [
    "--set", "training.batch_size=200",
    "--set", "data.eval_examples=1001",
]  # fmt: skip
TRAIN_ARGS = [
    "configs/two_tower_synthetic.yaml",
    "--set", "model.loss.type=in_batch_softmax",
    "--set", "data.synthetic.positive_fraction=1.0",
    "--set", "data.train_examples=2000",
    "--set", "training.steps=5",
    "--set", "training.log_every=5",
    "--set", "training.eval_every=0",
    "--set", "checkpoint.every=5",
    "--set", "logging.progress_bar=false",
    "--set", "logging.tensorboard=false",
    *EVAL_ARGS,
]  # fmt: skip
KEYS = ("loss", "binary_accuracy", "in_batch_top1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run = tmp_path_factory.mktemp("exact_eval") / "run"
    try:
        run_job([EXE, "train", *TRAIN_ARGS, "--run-dir", str(run)], 300, cwd=ROOT).check()
        yield run
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


def _evaluate(trained: Path, where: Path, strategy: str) -> dict[str, float]:
    """The eval record `dist-share evaluate` appends, on a copy of the trained run."""
    run = where / strategy
    shutil.copytree(trained, run)
    cmd = [EXE, "evaluate", str(run), "--strategy", strategy, *EVAL_ARGS]
    if strategy == "mirrored":
        cmd += ["--set", "strategy.num_cpu_devices=2"]
    if strategy == "horovod":
        cmd = local_horovodrun_command(2, cmd)
    job = run_job(cmd, 300, cwd=ROOT).check()
    assert job.output.count("eval (step 5)") == 1, job.output[-3000:]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["split"] == "eval" and record["step"] == 5
    return {k: record[k] for k in KEYS}


@pytest.fixture(scope="module")
def local(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return _evaluate(trained, tmp_path_factory.mktemp("exact_eval_local"), "local")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["mirrored", "horovod"])
def test_evaluate_gives_the_local_metrics(
    strategy: str, trained: Path, local: dict[str, float], tmp_path: Path
) -> None:
    got = _evaluate(trained, tmp_path, strategy)
    # Counts over 1001 examples: exactly equal; the loss up to the order of float sums.
    assert got["binary_accuracy"] == local["binary_accuracy"]
    assert got["in_batch_top1"] == local["in_batch_top1"]
    assert got["loss"] == pytest.approx(local["loss"], rel=1e-5)
    assert 0 < local["in_batch_top1"] < 1


def test_in_batch_top1_counts_a_tie_with_the_best_as_a_hit_in_any_order() -> None:
    """Rows 0 and 2 share their candidate: both are hits, whichever comes first, so the value
    does not depend on the order in which replicas' rows are gathered."""
    from dist_share.model.metrics import InBatchTop1

    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [-1.0, 0.5]], np.float32)
    candidates = np.array([[2.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0]], np.float32)
    pairs = np.stack([queries, candidates], axis=1)
    hits = InBatchTop1()(None, pairs).numpy()
    np.testing.assert_array_equal(hits, [1, 1, 1, 0])
    order = [2, 3, 0, 1]
    np.testing.assert_array_equal(InBatchTop1()(None, pairs[order]).numpy(), hits[order])


def test_a_replica_past_the_end_of_the_split_evaluates_zero_rows_of_a_conv_tower() -> None:
    """TensorFlow's oneDNN convolution gives an empty batch the wrong shape; the evaluator runs
    the model on one row of zeros instead and counts nothing."""

    import tensorflow as tf

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy
    from dist_share.train.trainer import Trainer
    from tests.workers import train_common as tc

    config = tc.run_config(training={"steps": 1, "batch_size": 8}, logging={"progress_bar": False})
    strategy = get_strategy(StrategyConfig(name="local"))
    trainer = Trainer(tc.BUILDERS["siamese_cfg"], strategy, config, None)
    features, labels = next(
        iter(tc.make_dataset_fn("siamese_cfg", 8)(tf.distribute.InputContext()))
    )
    step = tf.function(trainer.evaluator._replica_eval_step)
    full, pairs = step(features, labels)
    empty, empty_pairs = step(tf.nest.map_structure(lambda t: t[:0], features), labels[:0])
    assert [len(t) for t in pairs] == [8, 8] and [len(t) for t in empty_pairs] == [0, 0]
    assert float(full["count"]) == 8 and float(empty["count"]) == 0
    assert all(float(v) == 0 for v in empty.values())
