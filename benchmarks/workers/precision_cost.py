"""Precision and XLA worker: compiled steps of one model under each policy, interleaved.

argv: OUT_DIR [common options]

One process builds a Trainer per variant (float32, mixed_bfloat16, mixed_float16, XLA,
mixed_bfloat16 with XLA) of one config and steps them round-robin, a block of steps each, so
that every variant sees the same machine load; the block times go to the JSON.
"""

from __future__ import annotations

import time

from benchmarks.workers.wlib import (
    bench_config,
    common_args,
    model_and_data,
    setup_threads,
    write_result,
)

VARIANTS = {
    "float32": [],
    "mixed_bfloat16": ["training.precision=mixed_bfloat16"],
    "mixed_float16": ["training.precision=mixed_float16"],
    "xla": ["training.jit_compile=true"],
    "mixed_bfloat16_xla": ["training.precision=mixed_bfloat16", "training.jit_compile=true"],
}


def main() -> None:
    args = common_args(__doc__).parse_args()
    threads = setup_threads(args.intra, args.inter)

    from dist_share.config.schema import StrategyConfig
    from dist_share.data.pipeline import train_input
    from dist_share.distribute.strategies import get_strategy
    from dist_share.train.trainer import Trainer

    strategy = get_strategy(StrategyConfig(name="local"))
    steps = (args.warmup + args.repeats) * args.block + 1
    loops, inputs = {}, {}
    for name, overrides in VARIANTS.items():
        cfg = bench_config(
            args.family, args.batch, steps, {"name": "local"}, [*overrides, *args.set]
        )
        build_spec, dataset_fn = model_and_data(cfg, args.batch)
        trainer = Trainer(build_spec, strategy, cfg, None)
        trainer.loop.step_times.per_rank = False  # no clock in the step: the compute alone
        trainer.state.restore()
        loops[name] = trainer.loop
        names = trainer.state.spec.stream_names
        inputs[name] = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.warmup + args.repeats):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            for _ in range(args.block):
                loop.train_step(inputs[name], 1)
            walls[name].append(time.perf_counter() - t0)
    write_result(
        args.out_dir,
        "rank0",
        {
            "rank": 0,
            "threads": threads,
            "block_steps": args.block,
            "warmup_blocks": args.warmup,
            "walls": walls,
            "compiled": {name: loop.replica_pass.compiled for name, loop in loops.items()},
        },
    )


if __name__ == "__main__":
    main()
