"""Scaling worker: examples/s of dist_share's Trainer under one strategy, per-replica batch fixed.

argv: OUT_DIR --strategy local|mirrored|multiworker|horovod [--devices N] --per-replica-batch B

Every process writes ``scaling_rank<r>.json``; the global rate is the global batch (B x
replicas) times the steps of a window over the window's wall time, measured on each rank
(the collectives keep the ranks in lock-step, so rank 0's number is the job's).
"""

from __future__ import annotations

import time

from benchmarks.workers.wlib import (
    bench_config,
    common_args,
    setup_threads,
    train_timed,
    write_result,
)


def main() -> None:
    p = common_args(__doc__)
    p.add_argument(
        "--strategy", choices=("local", "mirrored", "multiworker", "horovod"), default="local"
    )
    p.add_argument("--devices", type=int, default=None, help="mirrored: logical CPU devices")
    p.add_argument("--per-replica-batch", type=int, default=64)
    args = p.parse_args()
    t_start = time.perf_counter()
    threads = setup_threads(args.intra, args.inter)

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy_cfg = {"name": args.strategy}
    if args.strategy == "mirrored":
        strategy_cfg["num_cpu_devices"] = args.devices or 2
    strategy = get_strategy(StrategyConfig(**strategy_cfg))
    replicas = strategy.num_replicas
    batch = args.per_replica_batch * replicas
    steps = (args.warmup + args.repeats) * args.block + 1
    cfg = bench_config(args.family, batch, steps, strategy_cfg, args.set)
    trainer, _, _ = train_timed(cfg, strategy, batch, args.block)
    w = args.warmup
    write_result(
        args.out_dir,
        f"scaling_rank{strategy.rank}",
        {
            "strategy": args.strategy,
            "rank": strategy.rank,
            "processes": strategy.world_size,
            "replicas": replicas,
            "per_replica_batch": args.per_replica_batch,
            "global_batch": batch,
            "threads": threads,
            "examples_per_sec": [args.block * batch / t for t in trainer.loop.windows[w:]],
            "cpu_s_per_step": [t / args.block for t in trainer.loop.cpu_windows[w:]],
            "comm_bytes_per_step": trainer.last_logs.get("comm_bytes_per_step"),
            "wall_s": time.perf_counter() - t_start,
        },
    )


if __name__ == "__main__":
    main()
