"""What the Trainer's per-call and per-interval host work costs: ``python -m
benchmarks.call_costs``.

Two questions of docs/PERFORMANCE.md section 1, answered in one process:

* A ``tf.function`` call: the same trivial step (read a batch, sum it, 8 outputs) called with
  the input iterator captured or passed, with two extra tensor arguments or none, returning a
  dict of 8 tensors or one stacked vector, and read back as floats or with one ``.numpy()``.
  The Trainer's step once had the first form and now has the last (``CustomLoop.compiled_step``).
* What the project defaults add at their intervals, on the benchmark model (siamese, batch 64):
  one ``TrainState.save`` (checkpoint every 200 steps by default), with and without the
  finiteness check that precedes it, and one ``MetricsLogger.log`` with TensorBoard (every 50).

Medians over interleaved rounds. Not part of ``run_all``: single calls, no ratio to a peer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

from dist_share.run.inputs import input_specs, make_dataset_fn


def _median_us(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # trace
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(1e6 * (time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def call_forms(rounds: int) -> dict[str, float]:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors((tf.zeros([4]), tf.zeros([]))).repeat()
    passed, captured = iter(ds), iter(ds)
    n, flag = tf.constant(1, tf.int32), tf.constant(0.0)
    keys = "abcdefgh"

    def logs(it: object) -> dict[str, tf.Tensor]:
        x, _ = next(it)
        return {k: tf.reduce_sum(x) + i for i, k in enumerate(keys)}

    @tf.function
    def old_form(it, n, flag):  # noqa: ANN001, ANN202
        return logs(it)

    @tf.function
    def captured_no_args():  # noqa: ANN202
        return tf.constant(0.0) + tf.reduce_sum(next(captured)[0])

    @tf.function
    def new_form():  # noqa: ANN202
        out = logs(captured)
        return tf.stack([out[k] for k in keys])

    return _median_us(
        {
            "iterator + 2 tensors passed, dict of 8, 8 floats (the old step's form)": lambda: {
                k: float(v) for k, v in old_form(passed, n, flag).items()
            },
            "iterator captured, no arguments, 1 output": captured_no_args,
            "iterator captured, no arguments, 8 stacked, one .numpy() (the step's form)": lambda: (
                new_form().numpy().tolist()
            ),
        },
        rounds,
        300,
    )


def interval_work(rounds: int) -> dict[str, float]:
    from benchmarks.workers.wlib import bench_config
    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy
    from dist_share.families.build import build_model
    from dist_share.train.guards import nonfinite
    from dist_share.train.trainer import Trainer

    strategy = get_strategy(StrategyConfig(name="local"))
    cfg = bench_config(
        "siamese",
        64,
        2,
        {"name": "local"},
        ["logging.progress_bar=false", "logging.tensorboard=true"],
    )
    specs = input_specs(cfg.data)
    dataset_fn = make_dataset_fn(cfg.data, "train", 64, cfg.training.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(lambda: build_model(cfg.model, specs), strategy, cfg, run_dir)
        trainer.train(dataset_fn)
        state, logger = trainer.loop.state, trainer.loop.logger
        variables = list(state.model.variables) + list(state.optimizer.variables)
        step = [10]

        def save() -> None:
            step[0] += 1
            state.global_step.assign(step[0])
            state.save()

        def log() -> None:
            step[0] += 1
            logger.log("train", step[0], {"loss": 0.5, "pair_accuracy": 0.5, "x": 1.0})

        out = _median_us(
            {
                "TrainState.save (one checkpoint)": save,
                "of which the finiteness check": lambda: nonfinite.first_nonfinite_variable(
                    variables
                ),
                "MetricsLogger.log (metrics.jsonl + TensorBoard)": log,
            },
            rounds,
            3,
        )
        out["variables saved"] = float(len(variables))
        trainer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print("tf.function call, median us per call:")
    for name, us in call_forms(args.rounds).items():
        print(f"  {us:8.1f}  {name}")
    print("interval work of the defaults (siamese, batch 64), median us per call:")
    for name, us in interval_work(args.rounds).items():
        print(f"  {us:8.1f}  {name}")


if __name__ == "__main__":
    main()
