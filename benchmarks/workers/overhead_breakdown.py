"""Where the Trainer's extra time per step goes (local strategy), piece by piece.

argv: OUT_DIR [common options]

Each stage adds one thing the Trainer does on top of a hand-written step, all on the same model
and data, timed in interleaved blocks (wall and process CPU time, median):

1. ``plain``: ``tf.function`` step (GradientTape, apply_gradients), batch fetched in Python.
2. ``+ metrics``: the same step also sums the ModelSpec's metrics (the Trainer logs them).
3. ``+ byte count``: ... and returns ``gradients.comm_bytes`` of the gradients.
   ``plain, iterator inside tf.function`` / ``plain, tf.distribute iterator + strategy.run``:
   the plain step fed the way the Trainer feeds it (the dataset distributed by the local
   strategy, ``strategy.run`` and ``strategy.reduce_sum`` around the step).
4. ``trainer compiled step``: the Trainer's own ``tf.function`` (iterator inside, strategy.run,
   reduce_gradients, reduce_sum), called directly.
5. ``+ host floats``: ``Trainer.train_step`` (the hook: reads the outputs into Python floats).
   The global step is counted inside the compiled step (stage 4), not from the host.

Calls the loop's ``compiled_step`` directly on purpose: it is a profiler.
"""

from __future__ import annotations

import collections
import time

from benchmarks.workers.wlib import bench_config, common_args, setup_threads, write_result
from dist_share.run.inputs import input_specs, make_dataset_fn


def main() -> None:
    args = common_args(__doc__).parse_args()
    threads = setup_threads(args.intra, args.inter)

    import keras
    import tensorflow as tf

    from dist_share.config.schema import StrategyConfig
    from dist_share.data.pipeline import train_input
    from dist_share.distribute.gradients import comm_bytes
    from dist_share.distribute.strategies import get_strategy
    from dist_share.families.build import build_model
    from dist_share.train.trainer import Trainer

    strategy = get_strategy(StrategyConfig(name="local"))
    cfg = bench_config(args.family, args.batch, 10**9, {"name": "local"}, args.set)
    specs = input_specs(cfg.data)
    dataset_fn = make_dataset_fn(cfg.data, "train", args.batch, cfg.training.seed)

    def build_spec():
        return build_model(cfg.model, specs)

    loop = Trainer(build_spec, strategy, cfg, None).loop
    t_iter = iter(
        strategy.distribute_dataset(train_input(dataset_fn, 0, loop.state.spec.stream_names))
    )
    compiled = loop.compiled_step(t_iter)  # the Trainer's step, bound to its iterator

    spec = build_spec()
    model, opt = spec.model, keras.optimizers.Adam(cfg.optimizer.learning_rate)
    p_iter = iter(dataset_fn(tf.distribute.InputContext()))

    def make_step(metrics: bool, count_bytes: bool):
        @tf.function
        def step(features, labels):
            with tf.GradientTape() as tape:
                preds = model(features, training=True)
                loss = tf.reduce_mean(spec.loss(labels, preds))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            out = {"loss": loss}
            if metrics:
                for name, fn in spec.metrics.items():
                    out[name] = tf.reduce_sum(tf.cast(fn(labels, preds), tf.float32))
            if count_bytes:
                out["bytes"] = comm_bytes(grads)
            return out

        return step

    steps = {k: make_step(*flags) for k, flags in {
        "plain": (False, False),
        "+ metrics": (True, False),
        "+ byte count": (True, True),
    }.items()}  # fmt: skip

    def plain_runner(step):
        def run() -> None:
            out = None
            for _ in range(args.block):
                features, labels = next(p_iter)
                out = step(features, labels)
            float(out["loss"])

        return run

    def trainer_fn() -> None:
        out = None
        for _ in range(args.block):
            out = compiled()
        out.numpy()

    def trainer_step() -> None:
        for _ in range(args.block):
            loop.train_step(t_iter)

    # The same plain step, fed the way the Trainer feeds its step: the iterator inside the
    # tf.function, and then tf.distribute's dataset/iterator + strategy.run (OneDeviceStrategy).
    in_fn_step = steps["plain"]

    @tf.function
    def plain_iter_in_fn(iterator):
        features, labels = next(iterator)
        return in_fn_step(features, labels)["loss"]

    @tf.function
    def plain_dist_iter(iterator):
        features, labels = next(iterator)
        out = strategy.run(lambda f, y: in_fn_step(f, y)["loss"], (features, labels))
        return strategy.reduce_sum(out)

    i_iter = iter(dataset_fn(tf.distribute.InputContext()))
    d_iter = iter(strategy.distribute_dataset(dataset_fn))

    def iter_runner(fn, iterator):
        def run() -> None:
            out = None
            for _ in range(args.block):
                out = fn(iterator)
            float(out)

        return run

    runners = {name: plain_runner(s) for name, s in steps.items()}
    runners["plain, iterator inside tf.function"] = iter_runner(plain_iter_in_fn, i_iter)
    runners["plain, tf.distribute iterator + strategy.run"] = iter_runner(plain_dist_iter, d_iter)
    runners["trainer compiled step"] = trainer_fn
    runners["+ host floats (train_step)"] = trainer_step

    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.warmup + args.repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            if r >= args.warmup:
                wall[name].append(1e3 * (time.perf_counter() - t0) / args.block)
                cpu[name].append(1e3 * (time.process_time() - c0) / args.block)

    def graph_ops(fn, *fn_args) -> collections.Counter:
        graph = fn.get_concrete_function(*fn_args).graph
        return collections.Counter(op.type for op in graph.get_operations())

    features, labels = next(p_iter)
    plain_ops = graph_ops(steps["plain"], features, labels)
    trainer_ops = graph_ops(compiled)
    write_result(
        args.out_dir,
        "breakdown",
        {
            "threads": threads,
            "global_batch": args.batch,
            "block_steps": args.block,
            "wall_ms_per_step": wall,
            "cpu_ms_per_step": cpu,
            "graph_ops": {
                "plain": sum(plain_ops.values()),
                "trainer": sum(trainer_ops.values()),
                "trainer_minus_plain_by_type": dict((trainer_ops - plain_ops).most_common()),
            },
        },
    )


if __name__ == "__main__":
    main()
