"""What does the Trainer's compiled step add to a plain one, and how much of it is the
non-finite guard? ``python -m benchmarks.guard_ab [--rounds 30]``.

The Trainer's compiled step checks the reduced gradients for NaN/inf and applies them inside a
``tf.cond`` (``dist_share/nonfinite.py``); mixed precision leaves that to the loss-scale
optimizer and applies directly. This times, in one process with interleaved blocks (the local
strategy, the benchmark model at batch 64): that step with the guard, the same step without
it, and a plain ``tf.function`` step on a model built from the same config, fed the same way
(the iterator inside the function; GradientTape, mean loss, Adam's ``apply_gradients``).
Ratios are to the plain step. Not part of ``run_all``: it answers one question of
docs/PERFORMANCE.md section 7 and uses the loop's internals (``_guard_gradients``,
``_train_fn``) on purpose.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from benchmarks.workers.wlib import bench_config
    from dist_share import data
    from dist_share.config import StrategyConfig
    from dist_share.data import train_input
    from dist_share.models import build_model
    from dist_share.strategies import get_strategy
    from dist_share.training import Trainer

    strategy = get_strategy(StrategyConfig(name="local"))
    cfg = bench_config("siamese", args.batch, 10**9, {"name": "local"})
    specs = data.input_specs(cfg.data)
    dataset_fn = data.make_dataset_fn(cfg.data, "train", args.batch, cfg.training.seed)
    one, no_preemption = tf.constant(1, tf.int32), tf.constant(0.0)

    steps = {}
    for name, guard in (("with guard", True), ("without guard", False)):
        loop = Trainer(lambda: build_model(cfg.model, specs), strategy, cfg, None).loop
        loop._guard_gradients = guard  # read when the step is traced, in train_loop_begin
        names = loop.state.spec.stream_names
        iterator = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
        loop.train_loop_begin()
        steps[name] = (loop._train_fn, iterator)

    spec = build_model(cfg.model, specs)
    optimizer = keras.optimizers.Adam(cfg.optimizer.learning_rate)

    @tf.function
    def plain_step(iterator, *_):
        features, labels = next(iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(spec.loss(labels, spec.model(features, training=True)))
        grads = tape.gradient(loss, spec.model.trainable_variables)
        optimizer.apply_gradients(zip(grads, spec.model.trainable_variables, strict=True))
        return {"loss": loss}

    iterator = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
    steps["plain step"] = (plain_step, iterator)

    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    warmup = 2
    for r in range(warmup + args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            fn, iterator = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                out = fn(iterator, one, no_preemption)
            float(out["loss"])
            if r >= warmup:
                wall[name].append(1e3 * (time.perf_counter() - t0) / args.block)
                cpu[name].append(1e3 * (time.process_time() - c0) / args.block)
    base_wall = statistics.median(wall["plain step"])
    base_cpu = statistics.median(cpu["plain step"])
    print(f"{args.rounds} interleaved rounds of {args.block} steps, batch {args.batch}, median:")
    for name in steps:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"  {name:14s} {w:7.3f} ms wall ({w / base_wall:.3f}x)  {c:6.2f} ms CPU ({c / base_cpu:.3f}x)"
        )


if __name__ == "__main__":
    main()
