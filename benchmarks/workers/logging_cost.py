"""Logging cost worker: the Trainer with all of its logging on, interleaved with bare steps of the same model.

argv: OUT_DIR [--strategy local|horovod] [--rounds R] [--profile-start S] [--profile-steps N] [--no-clock]
      [common options]

One process (one per Horovod rank) builds two Trainers of one config. The ``bare`` one is only
stepped: its compiled step without the clock read inside it (as under
``training.deterministic``), called block by block with no logging around it, no TensorBoard,
no metrics.jsonl. The other trains through its whole loop with everything on: TensorBoard
scalars every ``log_every`` steps, HParams, the step's graph, each rank's own step time, the
gradient norm, metrics.jsonl (``on``), or that and a ``training.profile`` window
(``profiled``). After each timed window of ``--block`` steps of the full loop a block of bare
steps runs (`wlib.make_timed_trainer`'s ``between``), so both see the same machine load: the
noise between separately started runs, larger than the cost measured here, cancels.
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


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--strategy", choices=("local", "horovod"), default="local")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile-start", type=int, default=150)
    p.add_argument("--profile-steps", type=int, default=100)
    p.add_argument("--no-clock", action="store_true", help="the full loop without its clock too")
    args = p.parse_args()
    threads = setup_threads(args.intra, args.inter)

    from dist_share.config.schema import StrategyConfig
    from dist_share.data.pipeline import train_input
    from dist_share.distribute.strategies import get_strategy
    from dist_share.train.trainer import Trainer

    strategy = get_strategy(StrategyConfig(name=args.strategy))
    steps = (args.warmup + args.repeats) * args.block + 1  # the last step closes the last window
    window = (args.profile_start, args.profile_start + args.profile_steps)

    def config(variant: str):
        overrides = [f"strategy.name={args.strategy}", *args.set]
        if variant != "bare":
            overrides.append("logging.tensorboard=true")
        if variant == "profiled":
            overrides += [
                f"training.profile.start_step={args.profile_start}",
                f"training.profile.steps={args.profile_steps}",
            ]
        return bench_config(args.family, args.batch, steps, {"name": args.strategy}, overrides)

    build_spec, dataset_fn = model_and_data(config("bare"), args.batch)
    bare = Trainer(build_spec, strategy, config("bare"), None)
    bare.loop.step_times.per_rank = False  # before its step is traced
    bare.state.restore()
    names = bare.state.spec.stream_names
    bare_input = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
    bare_wall: list[float] = []
    bare_cpu: list[float] = []

    def bare_block() -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.block):
            bare.loop.train_step(bare_input, 1)
        bare_wall.append(time.perf_counter() - t0)
        bare_cpu.append(time.process_time() - c0)

    timed = make_timed_trainer(args.block, between=bare_block)
    rounds = []
    for _ in range(args.rounds):
        for variant in ("on", "profiled"):
            bare_wall.clear()
            bare_cpu.clear()
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = timed(build_spec, strategy, config(variant), run_dir)
                if args.no_clock:
                    trainer.loop.step_times.per_rank = False
                trainer.train(dataset_fn)
                trainer.close()
            rounds.append(
                {
                    "variant": variant,
                    "wall": trainer.loop.windows,
                    "cpu": trainer.loop.cpu_windows,
                    "bare_wall": list(bare_wall),
                    "bare_cpu": list(bare_cpu),
                }
            )
    bare.loop.release_input()

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
        "runs": rounds,
    }
    write_result(args.out_dir, f"logging_{args.strategy}_rank{strategy.rank}", result)


if __name__ == "__main__":
    main()
