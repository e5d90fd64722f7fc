"""Logging cost worker: the same run with TensorBoard off, with all of it on, and with a profiler window.

argv: OUT_DIR [--strategy local|horovod] [--rounds R] [--profile-start S] [--profile-steps N]
      [common options]

Each round trains three fresh Trainers of one config in this process, one after the other:
``off`` (metrics.jsonl only: no TensorBoard, no clock read inside the step, as under
``training.deterministic``), ``on`` (the defaults: TensorBoard scalars every ``log_every`` steps,
HParams, the step's graph, the gradient norm, each rank's own step time) and ``profiled`` (``on``
with a ``training.profile`` window). Every run is timed in windows of ``--block`` steps
(`wlib.make_timed_trainer`); a round's ratios are of medians over its windows, and rounds
alternate the order of the variants so that a drift of the machine's load does not favour one.
Each window's wall time and this process's CPU time are kept.
"""

from __future__ import annotations

import tempfile

from benchmarks.workers.wlib import (
    bench_config,
    common_args,
    make_timed_trainer,
    model_and_data,
    setup_threads,
    write_result,
)

VARIANTS = ("off", "on", "profiled")


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--strategy", choices=("local", "horovod"), default="local")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile-start", type=int, default=150)
    p.add_argument("--profile-steps", type=int, default=100)
    args = p.parse_args()
    threads = setup_threads(args.intra, args.inter)

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name=args.strategy))
    steps = (args.warmup + args.repeats) * args.block + 1  # the last step closes the last window
    window = (args.profile_start, args.profile_start + args.profile_steps)

    def config(variant: str):
        overrides = [f"strategy.name={args.strategy}", *args.set]
        if variant != "off":
            overrides.append("logging.tensorboard=true")
        if variant == "profiled":
            overrides += [
                f"training.profile.start_step={args.profile_start}",
                f"training.profile.steps={args.profile_steps}",
            ]
        return bench_config(args.family, args.batch, steps, {"name": args.strategy}, overrides)

    build_spec, dataset_fn = model_and_data(config("off"), args.batch)
    timed = make_timed_trainer(args.block)
    rounds = []
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        seconds: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for variant in order:
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = timed(build_spec, strategy, config(variant), run_dir)
                if variant == "off":
                    trainer.loop.step_times.per_rank = False  # before the step is traced
                trainer.train(dataset_fn)
                trainer.close()
            seconds[variant] = trainer.loop.windows
            cpu[variant] = trainer.loop.cpu_windows
        rounds.append({"wall": seconds, "cpu": cpu})

    result = {
        "strategy": args.strategy,
        "world_size": strategy.world_size,
        "rank": strategy.rank,
        "family": args.family,
        "global_batch": args.batch,
        "block_steps": args.block,
        "warmup_blocks": args.warmup,
        "steps_per_run": steps,
        "profile_window": window,
        "threads": threads,
        "rounds": rounds,
    }
    write_result(args.out_dir, f"logging_{args.strategy}_rank{strategy.rank}", result)


if __name__ == "__main__":
    main()
