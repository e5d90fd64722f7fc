"""Peak memory of micro-batches (GradCache) against one batch of the same global size.

    python -m benchmarks.gradcache_memory [--steps 3] [--ks 1,2,8] [--set KEY=VALUE ...]

Trains the two-tower config with the in-batch softmax (``negatives: global``) for a few steps
at ``grad_accum_steps: k`` for each k, one process per k, and prints the peak bytes held by
TensorFlow's CPU allocator during the steps (``TF_CPU_ALLOCATOR_USE_BFC=true``, so that
TensorFlow counts them) and the process's peak RSS. ``--set`` overrides go to every run (a
deeper tower or a larger batch makes the activations, which micro-batches free, dominate).
Not part of run_all: its figures are quoted in docs/PERFORMANCE.md with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

from tests.helpers.processes import run_job, worker_env

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "two_tower_synthetic.yaml"
BASE = (
    "model.loss.type=in_batch_softmax",
    "data.synthetic.positive_fraction=1.0",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "training.eval_every=0",
)


def measure(k: int, steps: int, overrides: list[str]) -> dict:
    """In this process: the allocator's peak during ``steps`` steps after the first (traced)."""
    import tensorflow as tf

    from dist_share.data.pipeline import train_input
    from dist_share.run.resolve import load_config
    from dist_share.run.session import Run

    cfg = load_config(CONFIG, [*BASE, *overrides, f"training.grad_accum_steps={k}"])
    run = Run(cfg)
    trainer = run.trainer(None)
    loop = trainer.loop
    names = trainer.state.spec.stream_names
    batches = iter(loop.strategy.distribute_dataset(train_input(run.inputs.train_fn, 0, names)))
    loop.train_step(batches)  # traces
    tf.config.experimental.reset_memory_stats("CPU:0")
    held = tf.config.experimental.get_memory_info("CPU:0")["current"]
    for _ in range(steps):
        logs = loop.train_step(batches)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return {
        "k": k,
        "held_between_steps_mib": held / 2**20,
        "peak_during_steps_mib": peak / 2**20,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(logs["loss"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ks", default="1,2,8")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure k
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(measure(a.one, a.steps, a.set)))
        return 0
    env = worker_env({"TF_CPU_ALLOCATOR_USE_BFC": "true"})
    rows = []
    for k in (int(x) for x in a.ks.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.gradcache_memory", "--one", str(k)]
        cmd += ["--steps", str(a.steps), *(f"--set={s}" for s in a.set)]
        out = run_job(cmd, timeout=900, env=env, cwd=os.fspath(CONFIG.parents[1])).check()
        line = [x for x in out.output.splitlines() if x.startswith("{")][-1]
        rows.append(json.loads(line))
    print(f"{'k':>3} {'allocator peak MiB':>19} {'held MiB':>9} {'peak RSS MiB':>13} {'loss':>10}")
    for r in rows:
        print(
            f"{r['k']:>3} {r['peak_during_steps_mib']:>19.1f} {r['held_between_steps_mib']:>9.1f}"
            f" {r['max_rss_mib']:>13.0f} {r['loss']:>10.6f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
