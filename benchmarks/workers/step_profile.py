"""Step-profile worker: one config's step time on one worker and what its gradients weigh.

argv: OUT_DIR --config configs/X.yaml [--strategy local|horovod] [common options]

The inputs of the scaling model (benchmarks/bench_scaling_model.py), measured on one config:

* the wall time of a training step of dist_share's Trainer (median over windows of `block`
  steps, warm-up dropped), with the threads given (1 intra + 1 inter-op thread: one core, the
  share of one worker in the 2-process runs here), at the config's global batch per worker;
* the gradient bytes of one step, split the way the collectives treat them: dense gradients
  (ring all-reduce), and per sparse (IndexedSlices) gradient the deduplicated rows one worker
  sends and the dense table size (all-gather vs all-reduce, the framework's switch);
* the Trainer's own ``comm_bytes_per_step`` as a cross-check.

Under ``--strategy horovod`` (2 processes) it measures the real 2-worker step the model is
checked against and then, with ``--probe-sizes``, probes the link those workers share: the
time of one Horovod allreduce against its size, from which the model fits latency and
bandwidth. Probing in the same job saves a second start of TensorFlow and Horovod.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.workers.wlib import common_args, setup_threads, train_timed, write_result


def allreduce_times(sizes: list[int], block: int, repeats: int, warmup: int) -> list[dict]:
    """Median seconds of one allreduce per size. Each size is all-reduced `block` times inside
    one tf.function (a while loop whose next input is the previous result, so the collectives
    run one after another, as a step's dependent collectives do)."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    out = []
    for nbytes in sizes:
        x = tf.ones([max(1, nbytes // 4)], tf.float32)

        @tf.function
        def loop(x: tf.Tensor, n: int = block) -> tf.Tensor:
            def body(i, y):
                return i + 1, hvd.allreduce(y, op=hvd.Average, name="probe") * 1.0

            return tf.while_loop(lambda i, y: i < n, body, (tf.constant(0), x))[1]

        times = []
        for r in range(warmup + repeats):
            t0 = time.perf_counter()
            loop(x).numpy()
            if r >= warmup:
                times.append((time.perf_counter() - t0) / block)
        out.append({"bytes": 4 * int(x.shape[0]), "seconds": statistics.median(times)})
    return out


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--strategy", choices=("local", "horovod"), default="local")
    p.add_argument("--probe-sizes", default="", help="allreduce sizes in bytes, a,b,... (horovod)")
    args = p.parse_args()
    threads = setup_threads(args.intra, args.inter)

    import tensorflow as tf

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute import gradients as G
    from dist_share.distribute.strategies import get_strategy
    from dist_share.run.resolve import load_config

    strategy = get_strategy(StrategyConfig(name=args.strategy))
    per_worker = load_config(args.config).training.batch_size
    batch = per_worker * strategy.num_replicas  # weak scaling: the config's batch per worker
    steps = (args.warmup + args.repeats) * args.block + 1
    overrides = [
        f"training.batch_size={batch}",
        f"training.steps={steps}",
        "training.eval_every=0",
        f"strategy.name={args.strategy}",
        "checkpoint.every=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *args.set,
    ]
    cfg = load_config(args.config, overrides)
    trainer, build_spec, dataset_fn = train_timed(cfg, strategy, batch, args.block)

    # Gradient bytes of one step of the same model on one worker's batch.
    spec = build_spec()
    features, labels = next(iter(dataset_fn(tf.distribute.InputContext())))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(spec.loss(labels, spec.model(features, training=True)))
    grads = tape.gradient(loss, spec.model.trainable_variables)
    dense_bytes = int(G.comm_bytes([g for g in grads if not isinstance(g, tf.IndexedSlices)]))
    tables = []
    for v, g in zip(spec.model.trainable_variables, grads, strict=True):
        if isinstance(g, tf.IndexedSlices):
            tables.append(
                {
                    "variable": v.path if hasattr(v, "path") else v.name,
                    "rows_bytes": int(G.comm_bytes([G.dedup_indexed_slices(g)])),
                    "naive_bytes": int(G.comm_bytes([g])),
                    "table_bytes": int(G.comm_bytes([tf.convert_to_tensor(g)])),
                }
            )
    w = args.warmup
    probe = []
    if args.probe_sizes and args.strategy == "horovod":
        sizes = [int(b) for b in args.probe_sizes.split(",")]
        probe = allreduce_times(sizes, args.block, args.repeats, args.warmup)
    write_result(
        args.out_dir,
        f"step_profile_rank{strategy.rank}",
        {
            "config": args.config.name,
            "strategy": args.strategy,
            "rank": strategy.rank,
            "replicas": strategy.num_replicas,
            "batch_per_worker": per_worker,
            "threads": threads,
            "step_s": [t / args.block for t in trainer.loop.windows[w:]],
            "cpu_s_per_step": [t / args.block for t in trainer.loop.cpu_windows[w:]],
            "dense_bytes": dense_bytes,
            "tables": tables,
            "trainer_comm_bytes_per_step": trainer.last_logs.get("comm_bytes_per_step"),
            "parameters": int(sum(int(v.numpy().size) for v in spec.model.trainable_variables)),
            "allreduce_points": probe,
            "finished": time.time(),
        },
    )


if __name__ == "__main__":
    main()
