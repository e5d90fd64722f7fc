"""Train tiny shared-weight models under one strategy and dump variables + checksums as JSON.

Run the same script under every launcher (plain python, horovodrun, mpirun, N multi-worker
processes); each process writes ``<out>.rank<r>.json`` with one entry per run in ``--runs``
(several runs share one process start, which is most of a run's cost). Tests compare the files.

``--checks`` adds other multi-process checks to the same launch, after the runs (CHECKS below:
the collectives smoke checks, the dense switch, TFRecord sharding, Keras fit of every family
under MirroredStrategy); each check's result, or its traceback, goes under ``checks.<name>``, so
one failing check fails only the tests that read it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from dist_share.files import atomic_write_text

# The batch-coupled models every launcher trains and compares: train_common.CONFIG_MODELS (the
# shipped configs) and a user's encoder with batch norm through SharedTower (user_bn).
COUPLED_MODELS = (
    "siamese_cfg",
    "two_tower_ibs",
    "multiview_bn",
    "user_bn",
    "triplet_mined",
    "triplet_semi",
    "two_tower_corrected",
)
# name -> (family, loop, strategy overrides[, training overrides])
K3 = {"steps_per_loop": 3, "log_every": 5}
RUNS = {
    "shared": ("shared", "custom", {}),
    "shared_accum": ("shared", "custom", {}),
    "two_tower": ("two_tower", "custom", {}),
    "two_tower_naive": (
        "two_tower",
        "custom",
        {"sparse": {"dedup": False, "dense_threshold": None}},
    ),
    "two_tower_dense": (
        "two_tower",
        "custom",
        {"sparse": {"dedup": True, "dense_switch": "static", "dense_threshold": 0.0}},
    ),
    "two_tower_sum": (
        "two_tower",
        "custom",
        {"horovod": {"op": "sum", "grouped_allreduce": False}},
    ),
    "two_tower_fp16": ("two_tower", "custom", {"horovod": {"compression": "fp16"}}),
    "shared_fit": ("shared", "keras_fit", {}),
    "shared_bn": ("shared_bn", "custom", {}),
    "user_tower": ("user_tower", "custom", {}),
    # 3 steps with a checkpoint, then a new trainer on the same run dir trains to 5.
    "shared_resume": ("shared", "custom", {}),
    "two_tower_fit": ("two_tower", "keras_fit", {}),
    # 3 steps per compiled call (logs every 5): must end exactly where one step per call ends.
    "shared_k3": ("shared", "custom", {}, K3),
    # ... and resumed from the checkpoint at the loop boundary, step 3.
    "shared_k3_resume": ("shared", "custom", {}, K3),
    # The uninterrupted run the SIGKILL test's resumed run must end at (train/test_training.py).
    "shared_12": ("shared", "custom", {}, {"steps": 12}),
    "two_tower_corrected_12": ("two_tower_corrected", "custom", {}, {"steps": 12}),
    # Batch-coupled models (batch norm, in-batch negatives), train_common.CONFIG_MODELS: the
    # same result on every launcher, with Horovod's average and sum reductions, and under fit.
    **{
        f"{model}{suffix}": (model, loop, overrides)
        for model in COUPLED_MODELS
        for suffix, loop, overrides in (
            ("", "custom", {}),
            ("_fit", "keras_fit", {}),
            ("_sum", "custom", {"horovod": {"op": "sum"}}),
        )
    },
    # Each replica's pass compiled by XLA: the uncompiled result; the precision policies: close
    # to float32 (tests/train/test_precision.py says how close).
    "shared_xla": ("shared", "custom", {}, {"jit_compile": "true"}),
    "two_tower_xla": ("two_tower", "custom", {}, {"jit_compile": "true"}),
    "shared_bf16": ("shared", "custom", {}, {"precision": "mixed_bfloat16"}),
    "shared_fp16": ("shared", "custom", {}, {"precision": "mixed_float16"}),
    "shared_bf16_xla": (
        "shared",
        "custom",
        {},
        {"precision": "mixed_bfloat16", "jit_compile": "true"},
    ),
    # The in-batch softmax with 2 micro-batches per replica (GradCache): the one-batch result.
    "two_tower_ibs_accum": ("two_tower_ibs", "custom", {}),
    # ... and with its corrections: the frequency estimate counts each step once.
    "two_tower_corrected_accum": ("two_tower_corrected", "custom", {}),
}


def _horovod_collectives(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import smoke_horovod

    return smoke_horovod.check(strategy.hvd)


def _tf_all_reduce(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import smoke_tf_strategy

    return smoke_tf_strategy.check(strategy.tf_strategy)


def _dense_switch(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import dense_switch

    if a.strategy == "horovod":
        return dense_switch.check(hvd=strategy.hvd)
    return dense_switch.check(strategy=strategy.tf_strategy)


def _records(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import records_shards

    dirs = a.shards.split(",")
    if a.strategy == "horovod":
        return records_shards.check(dirs, hvd=strategy.hvd)
    return records_shards.check(dirs, strategy=strategy.tf_strategy)


def _model_families(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import towers_mirrored

    return towers_mirrored.check(strategy.tf_strategy)


def _signals(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import signals_check

    return signals_check.check(strategy, os.path.join(os.path.dirname(a.out), "signals"))


def _xla_coupled(strategy: Any, a: argparse.Namespace) -> dict:
    from tests.workers import xla_coupled

    return xla_coupled.check(strategy)


# name -> check(strategy, args) -> JSON-able result (see the modules for what each checks).
CHECKS: dict[str, Callable[[Any, argparse.Namespace], dict]] = {
    "horovod_collectives": _horovod_collectives,
    "tf_all_reduce": _tf_all_reduce,
    "dense_switch": _dense_switch,
    "records": _records,
    "model_families": _model_families,
    "signals": _signals,
    "xla_coupled": _xla_coupled,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="local")
    p.add_argument("--runs", default="shared", help="comma list of RUNS names")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--num-cpu-devices", type=int, default=None)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--ids", action="store_true", help="also dump the example ids each replica sees")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--checks", default="", help="comma list of CHECKS names, run after the runs")
    p.add_argument("--shards", default="", help="comma list of shard directories (records)")
    a = p.parse_args()

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.gradients import GradientOptions
    from dist_share.distribute.strategies import get_strategy

    # First thing: logical devices / TF_CONFIG / hvd.init must happen before TF initialises.
    strategy = get_strategy(StrategyConfig(name=a.strategy, num_cpu_devices=a.num_cpu_devices))

    import keras
    import numpy as np

    from dist_share.run.resolve import replace
    from dist_share.train.loops.custom import CustomLoop
    from dist_share.train.trainer import Trainer
    from tests.workers import train_common as tc

    class SlowLoop(CustomLoop):
        """Lets the kill test catch the run between checkpoints."""

        def train_step(self, iterator, num_steps=1):
            if a.step_delay:
                time.sleep(a.step_delay)
            return super().train_step(iterator, num_steps)

    result: dict = {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "num_replicas": strategy.num_replicas,
        "runs": {},
    }
    if a.ids:
        dist = strategy.distribute_dataset(tc.make_dataset_fn("shared", a.batch, with_ids=True))
        seen: dict[str, list[int]] = {}
        for features, _ in dist:
            local = strategy.local_results(features["id"])
            for i, ids in enumerate(local):
                replica = strategy.rank * len(local) + i
                seen.setdefault(str(replica), []).extend(int(x) for x in np.asarray(ids))
        result["ids"] = seen

    for name in a.runs.split(","):
        family, loop, overrides, *training = RUNS[name]
        strategy_cfg = {"name": a.strategy, "num_cpu_devices": a.num_cpu_devices, **overrides}
        sections = {
            "optimizer": {"name": "sgd", "learning_rate": tc.LEARNING_RATES.get(family, a.lr)},
            "training": {
                "steps": a.steps,
                "batch_size": a.batch,
                "grad_accum_steps": 2 if name.endswith("_accum") else 1,
                "loop": loop,
                "log_every": 1,
                "eval_every": 0,
                "deterministic": True,
                "seed": 3,
                **(training[0] if training else {}),
            },
            "strategy": strategy_cfg,
            "checkpoint": {"every": a.ckpt_every, "keep": 3, "resume": True},
            "logging": {"tensorboard": a.run_dir is not None, "progress_bar": False},
        }
        config = tc.run_config(**sections)
        strategy.gradient_options = GradientOptions.from_config(config.strategy)
        loop_cls = SlowLoop if loop == "custom" else None
        run_dir = a.run_dir
        if name.endswith("_resume"):
            run_dir = os.path.join(os.path.dirname(os.path.abspath(a.out)), name)
            first = replace(config, "training.steps=3")
            trainer = Trainer(tc.BUILDERS[family], strategy, first, run_dir, loop=loop_cls)
            trainer.train(tc.make_dataset_fn(family, a.batch))
            trainer.close()
        trainer = Trainer(tc.BUILDERS[family], strategy, config, run_dir, loop=loop_cls)
        chief_logs: list[dict] = []
        if loop == "keras_fit":
            trainer.loop.chief_callbacks.append(
                keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda e, logs, out=chief_logs: out.append(logs)
                )
            )
        run: dict = {
            "initial": {v.path: np.asarray(v.numpy()).tolist() for v in trainer.model.weights}
        }
        # Global eval batch 12: shards of 32 examples end in a partial batch on every replica.
        eval_fn = tc.make_dataset_fn(family, 12, drop_remainder=False) if a.eval else None
        run["eval"] = trainer.train(tc.make_dataset_fn(family, a.batch), eval_fn)
        run["start_step"] = trainer.start_step
        run["chief_callback_logs"] = [{k: float(v) for k, v in x.items()} for x in chief_logs]
        run["last_logs"] = trainer.last_logs
        run["variables"] = {v.path: np.asarray(v.numpy()).tolist() for v in trainer.model.weights}
        # Every local copy of every variable (MirroredStrategy keeps one per device).
        copies: list[dict[str, float]] = []
        for v in trainer.model.weights:
            for i, c in enumerate(strategy.local_results(v.value)):
                while len(copies) <= i:
                    copies.append({})
                copies[i][v.path] = float(np.sum(np.asarray(c.numpy(), np.float64) ** 2))
        run["replica_checksums"] = copies
        run["step"] = int(trainer.global_step.numpy())
        trainer.close()
        result["runs"][name] = run

    result["checks"] = {}
    for name in filter(None, a.checks.split(",")):
        try:
            result["checks"][name] = CHECKS[name](strategy, a)
        except Exception:  # noqa: BLE001 - the tests that read this check show the traceback
            result["checks"][name] = {"error": traceback.format_exc()}
            print(f"check {name} failed:\n{result['checks'][name]['error']}", file=sys.stderr)

    atomic_write_text(f"{a.out}.rank{strategy.rank}.json", json.dumps(result))


if __name__ == "__main__":
    main()
