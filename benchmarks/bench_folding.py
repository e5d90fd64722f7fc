"""Stream folding: one block call on N streams stacked on the batch axis vs N block calls.

For a dense tower (3 x 512, batch 64 per stream) and a small conv tower, at N = 1, 2, 4, 8, 16
streams, each variant's full training step (forward, backward, SGD apply) runs in a
``tf.function``; tracing/warm-up is excluded, then timed blocks of steps of every variant are
interleaved and the median is taken (so load from other processes on the shared cores hits all
variants alike). Variants:

* ``per_stream``      -- fold=False, list input: N block calls, gradients summed by AddN.
* ``folded_list``     -- fold=True, list input: concat -> one call -> split.
* ``folded_stacked``  -- fold=True, stacked ``[B, N, ...]`` input: reshape -> one call -> reshape.
* ``*_jit``           -- the same step with ``jit_compile=True`` (XLA).

``--towers keras_application`` (with ``--streams 2,4,8``) times a user tower instead: a
``keras.applications.MobileNetV3Small`` (weights=None, minimalistic, alpha 0.75, 32x32x3, 8
images per stream, the application of the README's example and tests/model/test_user_towers.py;
its 34 BatchNormalization layers run per stream under folding, see docs/TOWERS.md), beside the
built-in conv tower measured in the same run (``--towers conv,keras_application``). What costs
time there is tracing: every variant's step is traced once per N, and its graph holds N copies
of the application (per stream) or of its BatchNormalization layers (folded), tens of seconds
each on a loaded 2-core machine. So the application gets fewer timed rounds (its steps are
long enough to time in few) and no XLA variants (slower on CPU, and a second trace each).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import bench_main

NAME = "folding"

DENSE = {"type": "mlp", "units": [512, 512], "activation": "relu"}  # + a 512 projection = 3 layers
DENSE_IN, DENSE_OUT, DENSE_BATCH = 512, 512, 64
CONV = {"type": "conv2d", "filters": [32, 32], "kernel_size": 3, "pool_size": 2, "dense": [128]}
CONV_IN, CONV_OUT, CONV_BATCH = (16, 16, 8), 64, 32
APP = {
    "type": "keras_application",
    "name": "MobileNetV3Small",
    "args": {"alpha": 0.75, "minimalistic": True, "include_preprocessing": False},
}
APP_IN, APP_OUT, APP_BATCH = (32, 32, 3), 64, 8
VARIANTS = ("per_stream", "folded_list", "folded_stacked", "per_stream_jit", "folded_stacked_jit")
TOWERS = ("dense", "conv", "keras_application")


def make_step(
    tower_kind: str, n: int, variant: str, batch: int | None = None
) -> tuple[Callable, int]:
    """A compiled training step for one variant; returns (step, examples per step)."""
    import keras
    import tensorflow as tf

    from dist_share.model.towers import SharedTower

    keras.utils.set_random_seed(0)
    if tower_kind == "dense":
        spec, shape, out_dim, b = DENSE, (DENSE_IN,), DENSE_OUT, batch or DENSE_BATCH
    elif tower_kind == "conv":
        spec, shape, out_dim, b = CONV, CONV_IN, CONV_OUT, batch or CONV_BATCH
    else:
        spec, shape, out_dim, b = APP, APP_IN, APP_OUT, batch or APP_BATCH
    fold = variant.startswith("folded")
    stacked = "stacked" in variant
    jit = variant.endswith("_jit")
    tower = SharedTower(spec, n, "shared", fold=fold, output_dim=out_dim)
    x = tf.random.normal((b, n, *shape))
    inputs = x if stacked else tf.unstack(x, axis=1)
    tower(inputs)
    variables = tower.trainable_variables
    opt = keras.optimizers.SGD(1e-4)
    opt.build(variables)

    @tf.function(jit_compile=jit)
    def step(inp):
        with tf.GradientTape() as tape:
            out = tower(inp, training=True)
            if isinstance(out, list):
                loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in out])
            else:
                loss = tf.reduce_mean(tf.square(out)) * n
        grads = tape.gradient(loss, variables)
        opt.apply(grads, variables)
        return loss

    def run_once():
        return step(inputs)

    return run_once, b * n


def time_variants(
    steps: dict[str, Callable],
    repeats: int,
    block: int,
    warmup: int = 2,
    cpu_ms: dict[str, float] | None = None,
    samples: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median wall milliseconds per step of each variant, timed in interleaved blocks.

    If `cpu_ms` is given it receives the median process CPU milliseconds per step too: less
    sensitive to other processes taking the shared cores (time spent preempted is not counted),
    though TF's spinning worker threads are. `samples` receives every round's wall times, so
    that ratios can be taken per round (adjacent in time) before the median.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn().numpy()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            fn = steps[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                out = fn()
            out.numpy()
            wall[name].append(1000.0 * (time.perf_counter() - t0) / block)
            cpu[name].append(1000.0 * (time.process_time() - c0) / block)
    if samples is not None:
        samples.update(wall)
    if cpu_ms is not None:
        cpu_ms.update({k: statistics.median(v) for k, v in cpu.items()})
    return {k: statistics.median(v) for k, v in wall.items()}


def conditions() -> dict[str, Any]:
    """Load and the busiest other processes now: the cores are shared, so say what ran beside."""
    import os

    from benchmarks.run_all import busy_processes

    return {"load_average": list(os.getloadavg()), "busy_processes": busy_processes()}


def run(
    quick: bool = False,
    towers: tuple[str, ...] = ("dense", "conv"),
    streams: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    before = conditions()
    streams = [4] if quick else list(streams or [1, 2, 4, 8, 16])
    repeats, block = (3, 2) if quick else (11, 3)
    app_repeats, app_block = (3, 2) if quick else (7, 2)
    rows = []
    for tower_kind in towers:
        app = tower_kind == "keras_application"
        variants = VARIANTS[:3] if app else VARIANTS
        for n in streams:
            steps = {}
            for variant in variants:
                steps[variant], examples = make_step(tower_kind, n, variant)
            cpu: dict[str, float] = {}
            rounds: dict[str, list[float]] = {}
            ms = time_variants(
                steps,
                app_repeats if app else repeats,
                app_block if app else block,
                warmup=1 if app else 2,
                cpu_ms=cpu,
                samples=rounds,
            )

            def speedup(variant: str, rounds=rounds) -> float:
                """Median over rounds of per_stream / variant, each pair measured back to back."""
                pairs = zip(rounds["per_stream"], rounds[variant], strict=True)
                return statistics.median(a / b for a, b in pairs)

            row: dict[str, Any] = {"tower": tower_kind, "streams": n, "examples_per_step": examples}
            for variant in variants:
                row[f"{variant}_ms"] = ms[variant]
            row["speedup_folded_stacked"] = speedup("folded_stacked")
            row["speedup_folded_list"] = speedup("folded_list")
            if "folded_stacked_jit" in variants:
                row["speedup_folded_stacked_jit"] = speedup("folded_stacked_jit")
                row["jit_speedup_per_stream"] = speedup("per_stream_jit")
            row["speedup_folded_stacked_cpu_time"] = cpu["per_stream"] / cpu["folded_stacked"]
            rows.append(row)
    return {
        "name": NAME,
        "description": (
            "ms per training step (fwd+bwd+SGD, tf.function, median over rounds); speedup = "
            "median over rounds of per_stream / variant (wall), or of median CPU times (_cpu_time)"
        ),
        "config": {
            "dense": {
                "block": DENSE,
                "input": DENSE_IN,
                "output_dim": DENSE_OUT,
                "batch_per_stream": DENSE_BATCH,
            },
            "conv": {
                "block": CONV,
                "input": list(CONV_IN),
                "output_dim": CONV_OUT,
                "batch_per_stream": CONV_BATCH,
            },
            "keras_application": {
                "block": APP,
                "input": list(APP_IN),
                "output_dim": APP_OUT,
                "batch_per_stream": APP_BATCH,
            },
            "towers": list(towers),
            "repeats": repeats,
            "steps_per_timed_block": block,
            "keras_application_repeats": app_repeats,
            "keras_application_steps_per_timed_block": app_block,
        },
        "conditions": {"before": before, "after": conditions()},
        "table": rows,
        "plot": {
            "x": "streams",
            "y": ["speedup_folded_stacked", "speedup_folded_list", "speedup_folded_stacked_jit"],
            "group": "tower",
            "logx": True,
            "ylabel": "speedup over per-stream",
            "title": "Stream folding: speedup of the training step",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """``--towers a,b`` and ``--streams 2,4,8`` pick the rows; results go to folding.json, or
    to folding_<towers>.json for another set of towers (the default run's file is kept)."""
    import argparse
    import functools
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--towers", default="dense,conv")
    parser.add_argument("--streams", default=None)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    towers = tuple(t for t in known.towers.split(",") if t)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        parser.error(f"unknown towers {unknown}; expected some of {TOWERS}")
    streams = tuple(int(n) for n in known.streams.split(",")) if known.streams else None
    name = NAME if towers == ("dense", "conv") else f"{NAME}_{'_'.join(towers)}"
    return bench_main(name, functools.partial(run, towers=towers, streams=streams), rest)


if __name__ == "__main__":
    raise SystemExit(main())
