"""Batched weight sets: a separate MLP tower's N sets in one batched matmul per layer vs one
set after another.

A ``separate`` tower of N MLP blocks (units [256, 256], a 128 projection, batch 64 per stream,
128 input features per stream) trains one step (forward, backward, SGD apply) in a
``tf.function``, once with ``batch_sets=True`` (one batched ``matmul`` over the stacked ``[N, in, out]``
kernels per layer, `dist_share.model.batched_sets`) and once with ``batch_sets=False`` (N matmuls per
layer), same weights. Timed in interleaved blocks in one process (benchmarks.bench_folding's
``time_variants``), median; speedup = median over rounds of unbatched / batched wall time
(adjacent in time), and the same ratio of process CPU time.

Both are also timed compiled by XLA (``tf.function(jit_compile=True)``): that separates the
cost of TensorFlow's CPU batched-matmul kernels from the cost of batching itself, since XLA
emits its own code for both formulations. A last table times the three matmuls of one layer
(forward, weight gradient, input gradient) alone, N plain matmuls against one batched matmul.

``stacked_xla`` is not the framework's path but the fastest layout found for it: the same
tower written by hand with each layer's weights held as one stacked ``[N, in, out]`` variable
(no per-call stacking, 6 variables for the optimizer instead of 6N) and compiled by XLA. It
bounds what storing the sets stacked would gain, at the price of a different checkpoint layout.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from benchmarks.bench_folding import conditions, time_variants
from benchmarks.common import bench_main

NAME = "batched_sets"
BLOCK = {"type": "mlp", "units": [256, 256], "activation": "relu"}
IN_FEATURES, OUT_DIM, BATCH = 128, 128, 64


def _sgd_step(forward: Callable, variables: list, x, n: int, xla: bool) -> Callable:
    """One compiled training step (forward, backward, SGD apply) of ``forward`` on ``x``."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.SGD(1e-4)
    opt.build(variables)

    @tf.function(jit_compile=xla)
    def step(inp):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(forward(inp))) * n
        grads = tape.gradient(loss, variables)
        opt.apply(grads, variables)
        return loss

    return lambda: step(x)


def make_step(n: int, batched: bool, batch: int = BATCH, xla: bool = False) -> Callable:
    import keras
    import tensorflow as tf

    from dist_share.model.towers import SharedTower

    keras.utils.set_random_seed(0)
    tower = SharedTower(BLOCK, n, "separate", output_dim=OUT_DIM, batch_sets=batched)
    x = tf.random.normal((batch, n, IN_FEATURES))
    tower(x)
    return _sgd_step(lambda inp: tower(inp, training=True), tower.trainable_variables, x, n, xla)


def make_stacked_step(n: int, batch: int = BATCH) -> Callable:
    """The same tower with stacked ``[N, in, out]`` weight variables, XLA-compiled."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    dims = [IN_FEATURES, *BLOCK["units"], OUT_DIM]
    kernels = [
        tf.Variable(tf.random.normal((n, a, b), stddev=(2.0 / a) ** 0.5))
        for a, b in zip(dims[:-1], dims[1:], strict=True)
    ]
    biases = [tf.Variable(tf.zeros((n, 1, b))) for b in dims[1:]]

    def forward(h):
        for i, (k, b) in enumerate(zip(kernels, biases, strict=True)):
            h = tf.matmul(h, k) + b
            h = tf.nn.relu(h) if i < len(kernels) - 1 else h
        return h

    x = tf.random.normal((n, batch, IN_FEATURES))
    return _sgd_step(forward, kernels + biases, x, n, xla=True)


def kernel_times(n: int, repeats: int, block: int) -> list[dict]:
    """The first layer's three matmuls at the benchmark's shapes, N separate vs one batched."""
    import tensorflow as tf

    units = BLOCK["units"][0]
    x = tf.random.normal((n, BATCH, IN_FEATURES))
    k = tf.random.normal((n, IN_FEATURES, units))
    g = tf.random.normal((n, BATCH, units))
    xs, ks, gs = tf.unstack(x), tf.unstack(k), tf.unstack(g)
    pairs = {
        "forward x @ k": (
            lambda: tf.add_n([tf.reduce_sum(a @ b) for a, b in zip(xs, ks, strict=True)]),
            lambda: tf.reduce_sum(tf.matmul(x, k)),
        ),
        "weight gradient x^T @ g": (
            lambda: tf.add_n(
                [
                    tf.reduce_sum(tf.matmul(a, b, transpose_a=True))
                    for a, b in zip(xs, gs, strict=True)
                ]
            ),
            lambda: tf.reduce_sum(tf.matmul(x, g, adjoint_a=True)),
        ),
        "input gradient g @ k^T": (
            lambda: tf.add_n(
                [
                    tf.reduce_sum(tf.matmul(a, b, transpose_b=True))
                    for a, b in zip(gs, ks, strict=True)
                ]
            ),
            lambda: tf.reduce_sum(tf.matmul(g, k, adjoint_b=True)),
        ),
    }
    rows = []
    for what, (separate, batched) in pairs.items():
        steps = {"separate": tf.function(separate), "batched": tf.function(batched)}
        ms = time_variants(steps, repeats, block)
        rows.append(
            {
                "matmul": what,
                "streams": n,
                "n_matmuls_ms": ms["separate"],
                "batched_matmul_ms": ms["batched"],
                "separate_over_batched": ms["separate"] / ms["batched"],
            }
        )
    return rows


def _ratios(samples: dict[str, list[float]], slow: str, fast: str) -> list[float]:
    """Per-round ratios of two variants' wall times (adjacent in time)."""
    return [a / b for a, b in zip(samples[slow], samples[fast], strict=True)]


def run(quick: bool = False) -> dict:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    streams = [2, 8] if quick else [2, 4, 8, 16]
    repeats, block = (3, 3) if quick else (15, 10)
    before = conditions()
    table = []
    for n in streams:
        steps = {
            "one_after_another": make_step(n, False),
            "batched": make_step(n, True),
            "one_after_another_xla": make_step(n, False, xla=True),
            "batched_xla": make_step(n, True, xla=True),
            "stacked_xla": make_stacked_step(n),
        }
        samples: dict[str, list[float]] = {}
        cpu: dict[str, float] = {}
        ms = time_variants(steps, repeats, block, cpu_ms=cpu, samples=samples)

        speedups = _ratios(samples, "one_after_another", "batched")
        table.append(
            {
                "streams": n,
                "examples_per_step": n * BATCH,
                "one_after_another_ms": ms["one_after_another"],
                "batched_ms": ms["batched"],
                "speedup": statistics.median(speedups),
                "speedup_min": min(speedups),
                "speedup_max": max(speedups),
                "speedup_cpu_time": cpu["one_after_another"] / cpu["batched"],
                "one_after_another_xla_ms": ms["one_after_another_xla"],
                "batched_xla_ms": ms["batched_xla"],
                "speedup_xla": statistics.median(
                    _ratios(samples, "one_after_another_xla", "batched_xla")
                ),
                "batched_xla_vs_one_after_another": statistics.median(
                    _ratios(samples, "one_after_another", "batched_xla")
                ),
                "stacked_xla_ms": ms["stacked_xla"],
                "stacked_xla_vs_one_after_another": statistics.median(
                    _ratios(samples, "one_after_another", "stacked_xla")
                ),
            }
        )
    target = next((r for r in table if r["streams"] == 8), None)
    kernels = kernel_times(8, repeats, 5 * block)
    return {
        "name": NAME,
        "description": (
            f"separate MLP tower (units {BLOCK['units']} + {OUT_DIM} projection, {IN_FEATURES} "
            f"input features, batch {BATCH} per stream), training step ms (fwd+bwd+SGD, "
            f"tf.function), {repeats} interleaved rounds of {block} steps, median; speedup = "
            "median over rounds of one_after_another / batched (wall); speedup_cpu_time = ratio "
            "of median process CPU time per step; the _xla columns time both compiled with "
            "jit_compile=True (speedup_xla: one_after_another_xla / batched_xla; "
            "batched_xla_vs_one_after_another: the default step over the batched XLA one); "
            "stacked_xla: a hand-written step with stacked [N, in, out] weight variables under "
            "XLA (not the framework's layout), stacked_xla_vs_one_after_another: the default step "
            "over it. "
            "Target: N = 8 at least 1.3x; not met on this CPU, so batch_sets stays off "
            "by default."
        ),
        "conditions_before": before,
        "conditions_after": conditions(),
        "table": table,
        "extra_tables": {
            "Target": [
                {
                    "target": "separate MLP tower, N = 8: batched speedup over one set after another",
                    "goal": ">= 1.3",
                    "measured": target["speedup"] if target else None,
                }
            ],
            "One layer's matmuls alone (N = 8, batch 64, 128 -> 256; ms per call, median)": kernels,
        },
        "plot": {
            "x": "streams",
            "y": ["speedup", "speedup_cpu_time", "speedup_xla", "stacked_xla_vs_one_after_another"],
            "logx": True,
            "title": "Batched weight sets: speedup over one set after another",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    raise SystemExit(main())
