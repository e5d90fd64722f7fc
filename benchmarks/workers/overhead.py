"""Overhead worker: dist_share's Trainer vs the same model in a hand-written loop, interleaved.

argv: OUT_DIR --strategy local|mirrored|horovod [--variant quiet,default,...] [common options]

One process (or one process per Horovod rank) builds the model twice from the same config:
once inside ``Trainer`` and once for a plain loop written the way a user would (local: a
``tf.function`` step with ``GradientTape``; Horovod: the loop of Horovod's own TF2 examples,
``hvd.DistributedGradientTape`` and a broadcast after the first step). The trainer's
``train_step`` hook hands over to a block of plain steps after each timed block of trainer
steps, so both see the same machine load. Several variants (comma-separated) run one after
another in the same process against the same compiled plain loop, each with its own Trainer,
its own interleaved plain blocks and its own result file: TensorFlow's start-up (a minute on
a loaded 2-core machine) is paid once.
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.workers.wlib import (
    bench_config,
    common_args,
    make_timed_trainer,
    model_and_data,
    setup_threads,
    write_result,
)

VARIANTS = ("quiet", "default", "default_spl10", "fit")


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--strategy", choices=("local", "mirrored", "horovod"), default="local")
    p.add_argument(
        "--variant",
        default="quiet",
        help="comma-separated, each one of: quiet: no run_dir, no progress bar; default: "
        "run_dir with metrics.jsonl, TensorBoard, progress bar and checkpoints every 200 steps "
        "(the project defaults); default_spl10: default + training.steps_per_loop=10; fit: "
        "quiet, loop keras_fit",
    )
    args = p.parse_args()
    variants = args.variant.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; expected some of {VARIANTS}")
    threads = setup_threads(args.intra, args.inter)

    import tensorflow as tf

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    # mirrored: 2 logical CPU devices in this process (made before anything else runs).
    devices = 2 if args.strategy == "mirrored" else None
    strategy = get_strategy(StrategyConfig(name=args.strategy, num_cpu_devices=devices))
    blocks = args.warmup + args.repeats
    steps = blocks * args.block + 1  # the last step closes the last window
    strategy_raw = {"name": args.strategy, "num_cpu_devices": devices}

    def variant_config(variant: str):
        overrides = list(args.set)
        if variant.startswith("default"):
            overrides += [
                "logging.progress_bar=true",
                "logging.tensorboard=true",
                "checkpoint.every=200",
            ]
        if variant == "default_spl10":
            overrides.append("training.steps_per_loop=10")
        if variant == "fit":
            overrides.append("training.loop=keras_fit")
        return bench_config(args.family, args.batch, steps, strategy_raw, overrides)

    # The model and data do not depend on the variant (only logging, checkpoints and the loop).
    base = variant_config(variants[0])
    build_spec, dataset_fn = model_and_data(base, args.batch)

    # ---- the hand-written loop -------------------------------------------------------------
    import keras

    lr = base.optimizer.learning_rate
    if args.strategy == "horovod":
        import horovod.tensorflow as hvd

        size, rank = hvd.size(), hvd.rank()
        ctx = tf.distribute.InputContext(size, rank, size)
    else:
        hvd, size, rank, ctx = None, 1, 0, tf.distribute.InputContext()
    mirrored = strategy.tf_strategy if args.strategy == "mirrored" else None
    if mirrored is not None:
        # The loop of TF's custom-training tutorial: variables in the strategy's scope, a
        # distributed dataset, strategy.run of a replica step whose Keras optimizer sums the
        # gradients across replicas, loss divided by the global batch.
        with mirrored.scope():
            plain = build_spec()
            plain_opt = keras.optimizers.Adam(lr)
            plain_opt.build(plain.model.trainable_variables)
        plain_iter = iter(mirrored.distribute_datasets_from_function(dataset_fn))
    else:
        plain = build_spec()
        plain_opt = keras.optimizers.Adam(lr)
        plain_iter = iter(dataset_fn(ctx).repeat())

    if mirrored is not None:

        def replica_step(features, labels):
            with tf.GradientTape() as tape:
                per_example = plain.loss(labels, plain.model(features, training=True))
                loss = tf.reduce_sum(per_example) / args.batch
            grads = tape.gradient(loss, plain.model.trainable_variables)
            plain_opt.apply_gradients(zip(grads, plain.model.trainable_variables, strict=True))
            return loss

        @tf.function
        def plain_step(features, labels):
            per_replica = mirrored.run(replica_step, (features, labels))
            return mirrored.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    elif hvd is None:

        @tf.function
        def plain_step(features, labels):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(plain.loss(labels, plain.model(features, training=True)))
            grads = tape.gradient(loss, plain.model.trainable_variables)
            plain_opt.apply_gradients(zip(grads, plain.model.trainable_variables, strict=True))
            return loss

    else:

        def tf_vars(vs):
            # Keras 3 variables wrap a tf.Variable; Horovod's broadcast needs the tf.Variable.
            return [v if isinstance(v, tf.Variable) else v.value for v in vs]

        @tf.function
        def plain_step(features, labels, first_batch=False):
            # As in horovod/examples/tensorflow2/tensorflow2_mnist.py.
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(plain.loss(labels, plain.model(features, training=True)))
            tape = hvd.DistributedGradientTape(tape)
            # Horovod 0.28 keys gradients by tf.Variable.ref(): hand it the wrapped variables.
            grads = tape.gradient(loss, tf_vars(plain.model.trainable_variables))
            plain_opt.apply_gradients(zip(grads, plain.model.trainable_variables, strict=True))
            if first_batch:
                hvd.broadcast_variables(tf_vars(plain.model.variables), root_rank=0)
                hvd.broadcast_variables(tf_vars(plain_opt.variables), root_rank=0)
            return loss

    plain_times: list[float] = []
    plain_cpu: list[float] = []

    def plain_block() -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = None
        for _ in range(args.block):
            features, labels = next(plain_iter)
            if hvd is not None and not plain_times and loss is None:
                loss = plain_step(features, labels, True)
            else:
                loss = plain_step(features, labels)
        float(loss)
        plain_times.append(time.perf_counter() - t0)
        plain_cpu.append(time.process_time() - c0)

    # ---- each variant's trainer, with the plain blocks interleaved ----------------------------
    Timed = make_timed_trainer(args.block, between=plain_block)
    for variant in variants:
        cfg = variant_config(variant)
        plain_times.clear()
        plain_cpu.clear()
        with tempfile.TemporaryDirectory() as run_dir:
            use_dir = run_dir if variant.startswith("default") else None
            if variant == "fit":
                from dist_share.train.trainer import Trainer

                trainer = Trainer(build_spec, strategy, cfg, use_dir)
                timer = _FitWindows(args.block, plain_block)
                trainer.loop.callbacks.append(timer)
            else:
                trainer = Timed(build_spec, strategy, cfg, use_dir)
                timer = trainer.loop
            trainer.train(dataset_fn)
            trainer.close()

        examples = args.block * args.batch  # global examples per block
        w = args.warmup
        result = {
            "strategy": args.strategy,
            "variant": variant,
            "family": args.family,
            "world_size": size,
            "rank": rank,
            "global_batch": args.batch,
            "block_steps": args.block,
            "warmup_blocks": w,
            "threads": threads,
            "trainer_examples_per_sec": [examples / t for t in timer.windows[w:]],
            "plain_examples_per_sec": [examples / t for t in plain_times[w:]],
            "trainer_cpu_ms_per_step": [1e3 * t / args.block for t in timer.cpu_windows[w:]],
            "plain_cpu_ms_per_step": [1e3 * t / args.block for t in plain_cpu[w:]],
            "parameters": int(sum(int(v.numpy().size) for v in plain.model.trainable_variables)),
        }
        write_result(args.out_dir, f"overhead_{args.strategy}_{variant}_rank{rank}", result)


class _FitWindows:
    """A Keras callback timing windows of `block` fit batches and running `between` after each
    window (untimed), like `wlib.make_timed_trainer` does for the custom loop."""

    def __new__(cls, block: int, between):  # noqa: ANN001, ANN204 - a keras.Callback factory
        import keras

        class FitWindows(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.windows: list[float] = []
                self.cpu_windows: list[float] = []
                self._count = 0
                self._t0 = self._c0 = 0.0

            def on_train_batch_begin(self, batch, logs=None) -> None:  # noqa: ANN001
                now, cpu = time.perf_counter(), time.process_time()
                if self._count and self._count % block == 0:
                    self.windows.append(now - self._t0)
                    self.cpu_windows.append(cpu - self._c0)
                    between()
                    now, cpu = time.perf_counter(), time.process_time()
                if self._count % block == 0:
                    self._t0, self._c0 = now, cpu
                self._count += 1

        return FitWindows()


if __name__ == "__main__":
    main()
