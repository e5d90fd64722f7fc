"""``dist-share``: train, evaluate, export, check configs, and launch distributed jobs.

Exit codes (docs/RELIABILITY.md): 0 success; 1 runtime failure; 2 bad config, data or usage
(the message names the key path, and no run directory is left behind); 3 a peer process died or
stopped answering; 4 non-finite loss or gradient; 75 preempted (SIGTERM: every rank stopped at
the same step and it was saved); 130 interrupted. After 1, 3 and 75, running the same command
again resumes from the newest checkpoint.

TensorFlow is imported only by the subcommands that need it, so ``--help`` and ``launch`` start
fast; Horovod is imported only by the ``horovod`` strategy, inside ``train``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_share.config.loading import dump
from dist_share.config.schema import STRATEGIES
from dist_share.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    DataError,
    JobError,
)
from dist_share.launch import supervise
from dist_share.launch.commands import (
    LAUNCHERS,
    ElasticLaunch,
    format_worker,
    horovodrun_command,
    mpirun_command,
    multiworker_commands,
)
from dist_share.launch.hosts import Host, parse_hosts, read_hostfile, total_slots


class UsageError(Exception):
    """A command line that parses but cannot be acted on (exit code 2)."""


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set or [])
    if getattr(args, "strategy", None):
        out.append(f"strategy.name={args.strategy}")
    if getattr(args, "steps", None) is not None:
        out.append(f"training.steps={args.steps}")
    return out


def _say(strategy: Any, text: str) -> None:
    if strategy is None or strategy.is_chief:
        print(text, flush=True)


def _format_metrics(metrics: dict[str, float]) -> str:
    """The loss first, then the metrics by name."""
    order = sorted(metrics, key=lambda k: (k != "loss", k))
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in order)


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from dist_share.run import directory as rundir
    from dist_share.run.inputs import RunInputs
    from dist_share.run.resolve import load_config
    from dist_share.run.session import Run

    cfg = load_config(args.config, _overrides(args))
    # The data is opened once, here: user files are checked before anything is created.
    inputs = RunInputs(cfg.data, cfg.training.batch_size, cfg.training.seed)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    existed = run_dir.exists()
    mode = rundir.check(run_dir, cfg, args.overwrite)
    run = Run(cfg, inputs)
    # One live run per directory: the chief holds the lock (the kernel frees it however the
    # process ends), taken before `prepare` may clear a run being overwritten.
    run_lock = rundir.lock(run_dir) if run.strategy.is_chief else None
    trainer = None
    try:
        if run.strategy.is_chief:
            rundir.prepare(run_dir, cfg, mode)
        trainer = run.trainer(run_dir)
        with run.input_errors():
            result = trainer.train(run.inputs.train_fn, run.inputs.eval_fn)
        if run.strategy.world_size > 1 and threading.current_thread() is threading.main_thread():
            # The run is complete and on disk. A SIGTERM from now on comes from a scheduler
            # stopping a job whose other rank exited first (e.g. compose's
            # --abort-on-container-exit, see docker/README.md): finish exiting, successfully.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ConfigError, DataError) as e:
        # A config problem found while building the model: leave no half-made run behind.
        # (Bad records met while training keep the run: its checkpoints are still good.)
        if run.strategy.is_chief and not existed and not e.found_while_training:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if run_lock is not None:
            run_lock.release()
    step = int(trainer.global_step.numpy())
    _say(run.strategy, f"final eval (step {step}): {_format_metrics(result)}")
    _say(run.strategy, f"run directory: {run_dir}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dist_share.run import directory as rundir
    from dist_share.run.resolve import load_config
    from dist_share.run.restored import latest_checkpoint
    from dist_share.run.session import Run

    target = Path(args.target)
    overrides = [*_overrides(args), "checkpoint.resume=true"]
    if target.is_dir():
        cfg = rundir.read_config(target, overrides)
        run_dir: Path | None = target
    else:
        cfg = load_config(target, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and latest_checkpoint(run_dir) is None:
        raise UsageError(
            f"{run_dir} has no checkpoint to evaluate (expected {run_dir / 'checkpoints'})"
        )
    run = Run(cfg)
    if args.index and not args.retrieval:
        raise UsageError("--index compares an approximate index with --retrieval's exact search")
    trainer = run.trainer(run_dir, retrieval=args.retrieval, index=args.index)
    try:
        step = trainer.restore()
        if run_dir is None:
            _say(
                run.strategy,
                "no run directory: evaluating an untrained model (a chance-level baseline)",
            )
        with run.input_errors():
            metrics = trainer.evaluate(run.inputs.eval_fn, step=step)
    finally:
        trainer.close()
    _say(run.strategy, f"eval (step {step}): {_format_metrics(metrics)}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from dist_share.run.export import export_model, export_tower

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    if args.tower is None:
        if out is not None:
            raise UsageError("--out is for a tower export (--tower NAME)")
        print(export_model(run_dir))
    else:
        print(export_tower(run_dir, args.tower, out))
    return EXIT_OK


def _strategy_overrides(args: argparse.Namespace) -> list[str]:
    """--set and --strategy; without --strategy, one local process (not the run's strategy,
    which may need a launcher)."""
    if getattr(args, "strategy", None):
        return _overrides(args)
    return ["strategy.name=local", "strategy.num_cpu_devices=null", *_overrides(args)]


def cmd_embed(args: argparse.Namespace) -> int:
    from dist_share.run.embedding import EmbedOptions, embed

    options = EmbedOptions(
        split=args.split,
        part_size=args.part_size,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    summary = embed(
        Path(args.run_dir), Path(args.out), args.tower, args.corpus, options,
        _strategy_overrides(args),
    )  # fmt: skip
    print(summary, flush=True)
    return EXIT_OK


def cmd_data_convert(args: argparse.Namespace) -> int:
    from dist_share.run.inputs import convert
    from dist_share.run.resolve import load_config

    cfg = load_config(args.config, _overrides(args))
    manifest = convert(
        cfg.data,
        args.out,
        shards=args.shards,
        eval_shards=args.eval_shards,
        compression="GZIP" if args.compression == "gzip" else "",
        overwrite=args.overwrite,
    )
    counts = ", ".join(
        f"{split}: {manifest.examples(split)} examples in "
        f"{sum(s.split == split for s in manifest.shards)} shards"
        for split in manifest.splits()
    )
    print(f"wrote {manifest.path} ({counts})")
    print(f"train from it with: --set data.source=tfrecord --set data.tfrecord.train={args.out}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from dist_share.run.inputs import stream_shapes
    from dist_share.run.resolve import load_config

    cfg = load_config(args.config, _overrides(args))
    shapes = stream_shapes(cfg.data)
    sys.stdout.write(dump(cfg))
    streams = ", ".join(f"{k} {v[1].name}{list(v[0])}" for k, v in shapes.items())
    print(f"# valid; streams: {streams}", file=sys.stderr)
    return EXIT_OK


def cmd_launch(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError(
            "launch needs the command to run after '--', e.g. -- dist-share train cfg.yaml --strategy horovod"
        )
    if args.hosts and args.hostfile:
        raise UsageError("give either --hosts or --hostfile, not both")
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
    elif args.hosts:
        hosts = parse_hosts(args.hosts)
    else:
        hosts = [Host("localhost", args.np or 1)]
    elastic = _elastic_launch(args)
    if elastic is not None and args.launcher != "horovodrun":
        raise UsageError(
            "--min-np, --max-np and --host-discovery-script need --launcher horovodrun"
        )
    if args.launcher == "multiworker":
        if args.np is not None and args.np != total_slots(hosts):
            raise UsageError("-np must equal the total slots for multiworker (one worker per slot)")
        workers = multiworker_commands(hosts, command, base_port=args.base_port)
        if args.dry_run:
            for w in workers:
                print(format_worker(w))
            return EXIT_OK
        return supervise.run_with_restarts(
            lambda: supervise.run_multiworker(workers), args.max_restarts
        )
    if args.launcher == "horovodrun":
        argv = horovodrun_command(
            hosts,
            command,
            args.np,
            args.transport,
            args.network_interface,
            args.ssh_port,
            hostfile=args.hostfile,
            elastic=elastic,
        )
    else:
        argv = mpirun_command(hosts, command, args.np, args.network_interface)
    if args.dry_run:
        print(shlex.join(argv))
        return EXIT_OK
    if shutil.which(argv[0]) is None:
        raise UsageError(f"{argv[0]} is not on PATH")
    return supervise.run_with_restarts(lambda: supervise.run(argv), args.max_restarts)


def _elastic_launch(args: argparse.Namespace) -> ElasticLaunch | None:
    """horovodrun's elastic flags, if any was given."""
    given = (args.min_np, args.max_np, args.host_discovery_script, args.blacklist_cooldown_range)
    if all(v is None for v in given):
        return None
    if args.host_discovery_script and (args.hosts or args.hostfile):
        raise UsageError("give --host-discovery-script or --hosts/--hostfile, not both")
    cooldown = args.blacklist_cooldown_range
    return ElasticLaunch(
        min_np=args.min_np,
        max_np=args.max_np,
        host_discovery_script=args.host_discovery_script,
        blacklist_cooldown_range=tuple(cooldown) if cooldown else None,
    )


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-share",
        description="Train shared-weight multi-stream models data-parallel (tf.distribute or Horovod).",
        epilog="exit codes: 0 ok, 1 runtime failure, 2 bad config or usage, 3 a peer process "
        "was lost, 4 non-finite values, 75 preempted (checkpoint saved), 130 interrupted; "
        "rerun after 1, 3 or 75 to resume",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"dist-share {importlib.metadata.version('dist_share')}",
    )
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    def add_verbose(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--verbose",
            action="store_true",
            help="also show TensorFlow's start-up messages (shown too when the environment sets "
            "TF_CPP_MIN_LOG_LEVEL to 0 or 1)",
        )

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a config key (VALUE is YAML: 3, 1e-3, true, [16, 32]); repeatable",
        )

    p = sub.add_parser(
        "train",
        help="train a config; writes RUN_DIR/{config.yaml,metrics.jsonl,checkpoints,tensorboard}",
    )
    p.add_argument("config", help="YAML config, e.g. configs/siamese_digits.yaml")
    p.add_argument("--strategy", choices=STRATEGIES, help="overrides strategy.name")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("--steps", type=int, help="overrides training.steps")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run directory that holds a different config",
    )
    add_set(p)
    add_verbose(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a run's last checkpoint (or an untrained config)")
    p.add_argument("target", metavar="RUN_DIR|CONFIG")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--run-dir", help="with a CONFIG: the run whose checkpoint to evaluate")
    p.add_argument(
        "--retrieval",
        action="store_true",
        help="also retrieval over the whole eval split: recall@1/5/10/100, hit rate, mAP@100, "
        "NDCG@10 (docs/RETRIEVAL.md)",
    )
    p.add_argument(
        "--index",
        choices=("faiss",),
        help="with --retrieval: also an approximate faiss HNSW index, its recall@10 against "
        "the exact search and its queries per second",
    )
    add_set(p)
    add_verbose(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="export a run's last checkpoint to RUN_DIR/export (SavedModel and .keras), or one "
        "tower alone to RUN_DIR/towers/NAME",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--tower",
        metavar="NAME",
        help="export this tower alone: its streams in, its embedding out (two_tower: query, "
        "candidate; siamese, triplet, multiview: a stream's name)",
    )
    p.add_argument("--out", help="with --tower: where (default RUN_DIR/towers/NAME)")
    add_verbose(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "embed",
        help="embed a corpus with one tower of a run: (id, vector) parts + manifest.json",
        description="Writes OUT/part-NNNNN-of-NNNNN.npz (ids, vectors, classes) and "
        "OUT/manifest.json, each part atomically. Under horovodrun, mpirun or multi-worker "
        "each process embeds its share of the parts; a rerun after a crash skips the parts "
        "already written (docs/RETRIEVAL.md).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tower",
        metavar="NAME",
        help="which tower (default: the one that embeds the corpus in retrieval: two_tower's "
        "candidate, the second stream of siamese and triplet)",
    )
    p.add_argument(
        "--corpus",
        metavar="PATH",
        help="an .npz with one array per stream of the tower (and optional 'ids', 'classes'), "
        "or a directory of shards from `dist-share data convert` (default: the run's own data)",
    )
    p.add_argument("--split", choices=("train", "eval"), default="eval")
    p.add_argument("--part-size", type=int, default=65536, help="rows per output part")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per forward pass")
    p.add_argument("--strategy", choices=STRATEGIES, help="default: local (one process)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace another run's embeddings in OUT"
    )
    add_set(p)
    add_verbose(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("data", help="data tools: convert a config's data into TFRecord shards")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser(
        "convert",
        help="write the train and eval splits of a config's data as TFRecord shards + manifest",
        description="Writes OUT/{train,eval}-NNNNN-of-NNNNN.tfrecord and OUT/manifest.json "
        "from the config's data source (digits families, two_tower_synthetic, npz, random), "
        "atomically. Train from them with data.source: tfrecord, data.tfrecord.train: OUT "
        "(docs/DATA.md).",
    )
    p.add_argument("config", help="YAML config whose data section names the source")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--shards", type=int, default=8, help="train shards (default 8; use a multiple of the "
        "number of workers so that each reads only its own files)",
    )  # fmt: skip
    p.add_argument("--eval-shards", type=int, help="eval shards (default: as --shards)")
    p.add_argument("--compression", choices=("none", "gzip"), default="none")
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT")
    add_set(p)
    add_verbose(p)
    p.set_defaults(func=cmd_data_convert)

    p = sub.add_parser(
        "config", help="validate a config and print it resolved (all defaults filled)"
    )
    p.add_argument("config")
    add_set(p)
    add_verbose(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "launch",
        help="print (--dry-run) or run a horovodrun / mpirun / multi-worker command",
        description="e.g. dist-share launch --launcher horovodrun --hosts node1:4,node2:4 -- "
        "dist-share train configs/siamese_digits.yaml --strategy horovod",
    )
    p.add_argument("--launcher", choices=LAUNCHERS, default="horovodrun")
    p.add_argument("--hosts", help="HOST:SLOTS,... (slots = processes; GPUs per node for Horovod)")
    p.add_argument("--hostfile", help="file with 'host slots=N' lines")
    p.add_argument(
        "-np", "--num-proc", dest="np", type=int, help="number of processes (default: all slots)"
    )
    p.add_argument(
        "--transport", choices=("gloo", "mpi"), default="gloo", help="horovodrun controller"
    )
    p.add_argument("--network-interface", help="NIC for collectives, e.g. eth0 or ib0")
    p.add_argument("--ssh-port", type=int, help="horovodrun: ssh port of the remote hosts")
    p.add_argument(
        "--base-port", type=int, default=23456, help="multiworker: first TF_CONFIG port per host"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the command(s) instead of running them"
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=int(os.environ.get("MAX_RESTARTS", "0") or 0),
        metavar="K",
        help="relaunch a job that failed (exit 1 or 3, or a rank killed by a signal) up to K "
        "times, with a back-off of 5 s doubling to 120 s; it resumes from the last checkpoint "
        "(default: $MAX_RESTARTS or 0)",
    )
    elastic = p.add_argument_group(
        "elastic Horovod (horovodrun over Gloo; train with --set strategy.horovod.elastic=true)"
    )
    elastic.add_argument(
        "--min-np", type=int, help="fewest workers to train with (fewer: wait for hosts)"
    )
    elastic.add_argument("--max-np", type=int, help="most workers the job grows to")
    elastic.add_argument(
        "--host-discovery-script",
        metavar="SCRIPT",
        help="executable printing the available HOST:SLOTS lines (run every second; replaces "
        "--hosts); -np is then the number to start with (default --min-np)",
    )
    elastic.add_argument(
        "--blacklist-cooldown-range",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="seconds a host whose worker failed stays out (default: for good)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=cmd_launch)
    return parser


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up lines (absl's log notice, oneDNN, CPU
    features) held back, so that the command's own lines are not buried under them. What was
    held back is shown if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    asked_for_tf_logs = os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if hasattr(args, "verbose") and not (args.verbose or asked_for_tf_logs):
        _import_tensorflow_quietly()
    try:
        return args.func(args)
    except (ConfigError, DataError, UsageError) as e:
        print(f"dist-share {args.command_name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JobError as e:
        print(f"dist-share {args.command_name}: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dist-share: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"dist-share {args.command_name}: failed (exit code {EXIT_FAILURE})", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
