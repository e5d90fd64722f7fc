"""What does the Trainer's compiled step add to a plain one, and what does each non-finite
guard cost? ``python -m benchmarks.guard_ab [--rounds 30]``.

The Trainer's compiled step checks the reduced gradients for NaN/inf every step
(``dist_share/train/guards/nonfinite.py``). Under ``on_nonfinite: stop`` (the default) it applies the update
and the host stops the run; under ``skip`` it applies the update inside a ``tf.cond``; mixed
precision leaves both to the loss-scale optimizer. This times, in one process with interleaved
blocks (the local strategy, the benchmark model at batch 64): the step under ``stop``, under
``skip``, with no guard, and a plain ``tf.function`` step on a model built from the same
config, fed the same way (the iterator inside the function; GradientTape, mean loss, Adam's
``apply_gradients``). Ratios are medians over rounds of per-round ratios to the plain step.
Not part of ``run_all``: it answers one question of docs/PERFORMANCE.md section 1 and uses the
loop's internals (``on_nonfinite``, ``_guard_gradients``, ``compiled_step``) on purpose.
"""

from __future__ import annotations

import argparse
import statistics
import time

from dist_share.run.inputs import input_specs, make_dataset_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from benchmarks.workers.wlib import bench_config
    from dist_share.config.schema import StrategyConfig
    from dist_share.data.pipeline import train_input
    from dist_share.distribute.strategies import get_strategy
    from dist_share.families.build import build_model
    from dist_share.train.trainer import Trainer

    strategy = get_strategy(StrategyConfig(name="local"))
    cfg = bench_config("siamese", args.batch, 10**9, {"name": "local"})
    specs = input_specs(cfg.data)
    dataset_fn = make_dataset_fn(cfg.data, "train", args.batch, cfg.training.seed)

    steps = {}
    # (name, on_nonfinite, guard): both are read when the step is traced
    for name, mode, guard in (
        ("stop (default)", "stop", True),
        ("skip", "skip", True),
        ("no guard", "stop", False),
    ):
        loop = Trainer(lambda: build_model(cfg.model, specs), strategy, cfg, None).loop
        loop.on_nonfinite, loop._guard_gradients = mode, guard
        names = loop.state.spec.stream_names
        iterator = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
        steps[name] = loop.compiled_step(iterator)  # traced at its first call

    spec = build_model(cfg.model, specs)
    optimizer = keras.optimizers.Adam(cfg.optimizer.learning_rate)

    iterator = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))

    @tf.function
    def plain_step():
        features, labels = next(iterator)  # captured, as the Trainer's step captures its own
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(spec.loss(labels, spec.model(features, training=True)))
        grads = tape.gradient(loss, spec.model.trainable_variables)
        optimizer.apply_gradients(zip(grads, spec.model.trainable_variables, strict=True))
        return loss

    steps["plain step"] = plain_step

    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    warmup = 2
    for r in range(warmup + args.rounds):
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            fn = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.block):
                out = fn()
            out.numpy()
            if r >= warmup:
                wall[name].append(1e3 * (time.perf_counter() - t0) / args.block)
                cpu[name].append(1e3 * (time.process_time() - c0) / args.block)
    print(f"{args.rounds} interleaved rounds of {args.block} steps, batch {args.batch}, median:")
    base = "plain step"
    for name in steps:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rw = statistics.median(a / b for a, b in zip(wall[name], wall[base], strict=True))
        rc = statistics.median(a / b for a, b in zip(cpu[name], cpu[base], strict=True))
        print(f"  {name:15s} {w:7.3f} ms wall ({rw:.3f}x)  {c:6.2f} ms CPU ({rc:.3f}x)")


if __name__ == "__main__":
    main()
