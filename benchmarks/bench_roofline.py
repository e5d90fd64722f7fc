"""Roofline: how close the dense tower's training step gets to this CPU's matmul throughput.

The step's FLOPs are counted analytically (matmuls only; bias, ReLU and the SGD update are a few
elementwise passes, <1% here): a dense layer with M rows, K inputs and U units costs 2MKU for
the forward matmul and 2MKU for each backward matmul (dW, and dX except for the first layer,
whose input needs no gradient). The reference is a large square matmul in a ``tf.function``
measured in the same process, interleaved with the steps, so both see the same machine load.
A hand-written step (raw ``tf.matmul`` chain, no Keras) shows what is left to framework overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.bench_folding import (
    DENSE,
    DENSE_BATCH,
    DENSE_IN,
    DENSE_OUT,
    conditions,
    make_step,
    time_variants,
)
from benchmarks.common import bench_main

NAME = "roofline"
PEAK_SIZE = 2048


def step_flops(n: int, batch: int = DENSE_BATCH) -> float:
    """Matmul FLOPs of one fwd+bwd step of the dense tower on n streams."""
    m = batch * n
    dims = [DENSE_IN, *DENSE["units"], DENSE_OUT]
    total = 0.0
    for i, (k, u) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        total += 2 * m * k * u * (2 if i == 0 else 3)
    return total


def _matmul_peak(size: int) -> tuple[Callable, float]:
    import tensorflow as tf

    a = tf.random.normal((size, size))
    b = tf.random.normal((size, size))

    @tf.function
    def mm():
        return tf.reduce_sum(tf.matmul(a, b)[:1, :1])

    return mm, 2.0 * size**3


def _raw_step(n: int, jit: bool) -> Callable:
    """The folded dense step written by hand: no Keras layers, no optimizer object."""
    import tensorflow as tf

    dims = [DENSE_IN, *DENSE["units"], DENSE_OUT]
    ws = [
        tf.Variable(tf.random.normal((k, u)) * 0.04)
        for k, u in zip(dims[:-1], dims[1:], strict=True)
    ]
    bs = [tf.Variable(tf.zeros((u,))) for u in dims[1:]]
    x = tf.reshape(tf.random.normal((DENSE_BATCH, n, DENSE_IN)), (-1, DENSE_IN))
    variables = ws + bs

    @tf.function(jit_compile=jit)
    def step():
        with tf.GradientTape() as tape:
            h = x
            for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
                h = tf.matmul(h, w) + b
                if i < len(ws) - 1:
                    h = tf.nn.relu(h)
            loss = tf.reduce_mean(tf.square(h)) * n
        grads = tape.gradient(loss, variables)
        for v, g in zip(variables, grads, strict=True):
            v.assign_sub(1e-4 * g)
        return loss

    return step


def _matmuls_only(n: int) -> Callable:
    """Exactly the step's matmuls (same shapes, same count), nothing else: the ceiling for
    these shapes, which separates "small matmuls are slower" from "the rest of the step"."""
    import tensorflow as tf

    m = DENSE_BATCH * n
    dims = [DENSE_IN, *DENSE["units"], DENSE_OUT]
    xs = [tf.random.normal((m, k)) for k in dims[:-1]]
    dys = [tf.random.normal((m, u)) for u in dims[1:]]
    ws = [tf.random.normal((k, u)) for k, u in zip(dims[:-1], dims[1:], strict=True)]

    @tf.function
    def step():
        outs = []
        for i, (x, dy, w) in enumerate(zip(xs, dys, ws, strict=True)):
            outs.append(tf.matmul(x, w)[0, 0])
            outs.append(tf.matmul(x, dy, transpose_a=True)[0, 0])
            if i > 0:
                outs.append(tf.matmul(dy, w, transpose_b=True)[0, 0])
        return tf.add_n(outs)

    return step


def profiler_flops(step: Callable) -> float:
    """tf.profiler's float_ops of a step's graph: a cross-check of the analytic count."""
    import tensorflow as tf

    graph = step.get_concrete_function().graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops)


def run(quick: bool = False) -> dict[str, Any]:
    before = conditions()
    streams = [8] if quick else [1, 8, 16]
    repeats, block = (3, 2) if quick else (9, 5)
    peak_sizes = [1024] if quick else [1024, PEAK_SIZE]
    matmuls = {f"matmul_{size}": _matmul_peak(size) for size in peak_sizes}
    rows = []
    flops_check: dict[str, dict[str, float]] = {}
    # Peak = the faster of the large matmuls, from its *best* round by wall time (a peak is the
    # best the machine did; steps use medians, so the wall fraction is conservative), and
    # separately from median CPU times (robust to other processes taking the shared cores).
    peaks: list[float] = []
    peaks_cpu: list[float] = []
    for n in streams:
        steps: dict[str, Callable] = {name: fn for name, (fn, _) in matmuls.items()}
        for variant in ("per_stream", "folded_list", "folded_stacked", "folded_stacked_jit"):
            steps[variant], _ = make_step("dense", n, variant)
        steps["raw_tf"] = _raw_step(n, jit=False)
        flops_check[str(n)] = {
            "analytic_gflop": step_flops(n) / 1e9,
            "tf_profiler_gflop": profiler_flops(steps["raw_tf"]) / 1e9,
        }
        steps["raw_tf_jit"] = _raw_step(n, jit=True)
        steps["matmuls_only"] = _matmuls_only(n)
        cpu: dict[str, float] = {}
        rounds: dict[str, list[float]] = {}
        ms = time_variants(steps, repeats, block, cpu_ms=cpu, samples=rounds)
        peaks.append(max(f / min(rounds[name]) for name, (_, f) in matmuls.items()) * 1000.0)
        peaks_cpu.append(max(f / cpu[name] for name, (_, f) in matmuls.items()) * 1000.0)
        flops = step_flops(n)
        for variant, t in ms.items():
            if variant in matmuls:
                continue
            rows.append(
                {
                    "streams": n,
                    "variant": variant,
                    "ms_per_step": t,
                    "step_gflop": flops / 1e9,
                    "gflops": flops / t / 1e6,
                    "gflops_cpu_time": flops / cpu[variant] / 1e6,
                }
            )
    # The peak is a property of the machine, not of N: the best seen over the whole run.
    peak, peak_cpu = max(peaks), max(peaks_cpu)
    for row in rows:
        row["matmul_peak_gflops"] = peak / 1e9
        row["fraction_of_peak"] = row["gflops"] * 1e9 / peak
        row["fraction_of_peak_cpu_time"] = row.pop("gflops_cpu_time") * 1e9 / peak_cpu
    return {
        "name": NAME,
        "description": (
            "dense tower (3 x 512, batch 64/stream) training step: achieved matmul FLOP/s as a "
            f"fraction of the faster of {peak_sizes} square fp32 matmuls measured in the same "
            "process, interleaved (by wall time, and by process CPU time)"
        ),
        "config": {
            "block": DENSE,
            "input": DENSE_IN,
            "output_dim": DENSE_OUT,
            "batch_per_stream": DENSE_BATCH,
            "peak_matmuls": peak_sizes,
            "repeats": repeats,
            "steps_per_timed_block": block,
        },
        "conditions": {"before": before, "after": conditions()},
        "flops_check": flops_check,
        "table": rows,
        "plot": {
            "x": "streams",
            "y": ["fraction_of_peak_cpu_time"],
            "group": "variant",
            "ylabel": "fraction of matmul peak",
            "title": "Dense tower step vs matmul peak",
        },
    }


def main(argv: list[str] | None = None) -> int:
    return bench_main(NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
