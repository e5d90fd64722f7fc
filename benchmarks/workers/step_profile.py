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
checked against.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.workers.wlib import common_args, setup_threads, train_timed, write_result


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--strategy", choices=("local", "horovod"), default="local")
    args = p.parse_args()
    threads = setup_threads(args.intra, args.inter)

    import tensorflow as tf

    from dist_share import gradients as G
    from dist_share.config import StrategyConfig, load_config
    from dist_share.strategies import get_strategy

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
            "finished": time.time(),
        },
    )


if __name__ == "__main__":
    main()
