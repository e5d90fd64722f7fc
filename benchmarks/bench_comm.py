"""Communication vs streams: the bytes one replica hands to the collective per step.

Two questions, both answered with the framework's own gradient preparation and byte counting
(`dist_share.distribute.gradients.prepare_gradient` / `comm_bytes`), on gradients from real models:

1. Towers. A shared tower's gradient is the *sum* over streams, so its all-reduce payload is
   the tower's parameter bytes whatever the number of streams N; separate towers send N times
   that.
2. A shared embedding table looked up by N streams. TF's gradient is an IndexedSlices with one
   row per lookup (N x batch rows); Horovod allgathers and tf.distribute concatenates exactly
   that ("naive"). Summing duplicate ids first ("dedup") sends one row per *distinct* id, which
   under Zipf-skewed ids is far fewer; "dense" is the whole table. "framework" is what
   dist_share actually sends with its default options (`reduce_gradients`: dedup, then the
   measured dense switch on the distinct rows); "static" is the earlier rule (dense when the
   static bound lookups / rows reaches 50 %), kept as the fallback.
3. The same choice at W workers (the cost model of `dist_share.distribute.gradients`, every worker assumed
   to send as many distinct rows as measured here): bytes through one worker's link per step
   for all-gathering the deduplicated rows, for ring-all-reducing the dense table, and for what
   the framework's rule picks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks.common import bench_main
from dist_share.config.schema import default_block

NAME = "comm"

# The default configs' conv tower, so the numbers are those of a real run.
TOWER_BLOCK = default_block()


def zipf_ids(rng: np.random.Generator, a: float, vocab: int, size: Any) -> np.ndarray:
    """Zipf(a) ids in [0, vocab): numpy's zipf starts at 1 and is unbounded, so clip to the
    vocabulary (the clip turns the tail mass into one more hot id, as a hashed OOV bucket would)."""
    return (np.minimum(rng.zipf(a, size=size), vocab) - 1).astype(np.int32)


def tower_rows(stream_counts: list[int], batch: int = 32) -> list[dict[str, Any]]:
    import tensorflow as tf

    from dist_share.distribute.gradients import GradientOptions, comm_bytes, prepare_gradient
    from dist_share.model.towers import SharedTower

    options = GradientOptions()
    rows = []
    rng = np.random.default_rng(0)
    for n in stream_counts:
        xs = [tf.constant(rng.random((batch, 8, 8, 1), dtype=np.float32)) for _ in range(n)]
        for sharing in ("shared", "separate"):
            tower = SharedTower(TOWER_BLOCK, num_streams=n, sharing=sharing, output_dim=32)
            with tf.GradientTape() as tape:
                outs = tower(xs, training=True)
                loss = tf.add_n([tf.reduce_mean(tf.square(o)) for o in outs])
            variables = tower.trainable_variables
            grads = tape.gradient(loss, variables)
            sent = int(comm_bytes([prepare_gradient(g, options) for g in grads]).numpy())
            params = int(sum(int(np.prod(v.shape)) for v in variables))
            rows.append(
                {
                    "part": "tower",
                    "sharing": sharing,
                    "streams": n,
                    "parameters": params,
                    "bytes_per_step": sent,
                    "bytes_vs_N1_shared": None,  # filled below
                }
            )
    base = next(r["bytes_per_step"] for r in rows if r["sharing"] == "shared")
    for r in rows:
        r["bytes_vs_N1_shared"] = r["bytes_per_step"] / base
    return rows


def embedding_rows(
    stream_counts: list[int], batch_sizes: list[int], vocab: int, dim: int, zipf_a: float
) -> list[dict[str, Any]]:
    import tensorflow as tf

    from dist_share.distribute.gradients import (
        GradientOptions,
        comm_bytes,
        dedup_indexed_slices,
        prepare_gradient,
        reduce_gradients,
    )

    options = GradientOptions()  # the framework defaults: dedup on, the measured dense switch
    static = GradientOptions(dense_switch="static")  # the fallback rule (50 % static density)
    table = tf.Variable(tf.random.normal([vocab, dim], stddev=0.01), name="shared_table")
    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        for n in stream_counts:
            ids = [tf.constant(zipf_ids(rng, zipf_a, vocab, batch)) for _ in range(n)]
            with tf.GradientTape() as tape:
                # Each stream looks up its own ids in the one table (query history, candidates, ...).
                loss = tf.add_n([tf.reduce_sum(tf.square(tf.gather(table, i))) for i in ids])
            (grad,) = tape.gradient(loss, [table])
            assert isinstance(grad, tf.IndexedSlices), type(grad)
            naive = int(comm_bytes([grad]).numpy())
            dedup = int(comm_bytes([dedup_indexed_slices(grad)]).numpy())
            dense = int(comm_bytes([tf.convert_to_tensor(grad)]).numpy())
            # One replica (the default strategy): what the trainer's step hands over.
            _, framework = reduce_gradients([grad], options, "tf_distribute")
            framework = int(framework.numpy())
            static_bytes = int(comm_bytes([prepare_gradient(grad, static)]).numpy())
            distinct = int(tf.size(tf.unique(grad.indices).y).numpy())
            rows.append(
                {
                    "part": "embedding",
                    "streams": n,
                    "batch": batch,
                    "lookups": n * batch,
                    "distinct_ids": distinct,
                    "naive_bytes": naive,
                    "dedup_bytes": dedup,
                    "dense_bytes": dense,
                    "framework_bytes": framework,
                    "static_bytes": static_bytes,
                    "naive_over_dedup": naive / dedup,
                    "framework_over_best": framework / min(dedup, dense),
                }
            )
    return rows


WORKERS = (2, 8, 16, 24, 25, 32, 64, 128, 512)


def link_rows(embeddings: list[dict[str, Any]], streams: int) -> list[dict[str, Any]]:
    """Per-worker link bytes at W workers for one stream count: all-gather of the deduplicated
    rows, ring all-reduce of the table, and the framework's pick (`dense_wins` on W x rows)."""
    from dist_share.distribute.gradients import allgather_bytes, dense_wins, ring_allreduce_bytes

    rows = []
    for r in embeddings:
        if r["streams"] != streams:
            continue
        for w in WORKERS:
            gather = allgather_bytes(r["dedup_bytes"], w)
            ring = ring_allreduce_bytes(r["dense_bytes"], w)
            dense = bool(dense_wins(w * r["dedup_bytes"], r["dense_bytes"], w))
            rows.append(
                {
                    "batch": r["batch"],
                    "workers": w,
                    "allgather_dedup_bytes": gather,
                    "ring_allreduce_dense_bytes": ring,
                    "framework_picks": "dense" if dense else "sparse",
                    "framework_bytes": ring if dense else gather,
                    "framework_over_best": (ring if dense else gather) / min(gather, ring),
                }
            )
    return rows


def run(quick: bool = False) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if quick:
        streams, tower_streams, batches, vocab, dim = [1, 4], [1, 2], [64], 5_000, 16
    else:
        streams, tower_streams, batches, vocab, dim = (
            [1, 2, 4, 8, 16],
            [1, 2, 4, 8, 16],
            [64, 512, 4096],
            100_000,
            64,
        )
    zipf_a = 1.2
    towers = tower_rows(tower_streams)
    embeddings = embedding_rows(streams, batches, vocab, dim, zipf_a)
    table = []
    for r in towers:
        table.append(
            {
                "case": f"tower {r['sharing']}",
                "streams": r["streams"],
                "batch": None,
                "bytes_per_step": r["bytes_per_step"],
                "relative": r["bytes_vs_N1_shared"],
            }
        )
    for r in embeddings:
        for kind in ("naive", "dedup", "dense", "static", "framework"):
            table.append(
                {
                    "case": f"embedding {kind}",
                    "streams": r["streams"],
                    "batch": r["batch"],
                    "bytes_per_step": r[f"{kind}_bytes"],
                    "relative": r[f"{kind}_bytes"] / r["dedup_bytes"],
                }
            )
    worst = max(r["framework_over_best"] for r in embeddings)
    target = next(
        (r for r in embeddings if r["streams"] == max(streams) and r["batch"] == max(batches)),
        None,
    )
    summary = [
        {
            "target": "Zipf embedding, 16 streams, batch 4096: framework bytes / dedup bytes",
            "goal": "<= 1.1",
            "measured": target["framework_bytes"] / target["dedup_bytes"] if target else None,
        },
        {
            "target": "every grid point: framework bytes / min(dedup, dense)",
            "goal": "<= 1.0",
            "measured": worst,
        },
    ]
    return {
        "name": NAME,
        "description": (
            "Bytes one replica hands to the gradient collective per step (dist_share.distribute.gradients."
            "comm_bytes after prepare_gradient). Tower: conv2d block on [8, 8, 1] streams, "
            "'relative' = bytes / bytes(shared, N=1). Embedding: one [vocab, dim] float32 table "
            f"(vocab={vocab}, dim={dim}) looked up by N streams of `batch` Zipf(a={zipf_a}) ids "
            "clipped to the vocab; 'relative' = bytes / dedup bytes. 'framework' is "
            "reduce_gradients with the defaults (measured dense switch) on one replica; "
            "'static' the earlier static-density rule."
        ),
        "params": {
            "tower_block": TOWER_BLOCK,
            "vocab": vocab,
            "dim": dim,
            "zipf_a": zipf_a,
            "stream_counts": streams,
            "batch_sizes": batches,
        },
        "towers": towers,
        "embeddings": embeddings,
        "table": table,
        "extra_tables": {
            "Targets": summary,
            "Bytes through one worker's link per step at W workers (cost model of "
            "dist_share.distribute.gradients; every worker sends the distinct rows measured above; "
            "16 streams)": link_rows(embeddings, max(streams)),
        },
        "plot": {
            "x": "streams",
            "y": ["bytes_per_step"],
            "group": ["case", "batch"],
            "logx": True,
            "logy": True,
            "ylabel": "bytes per replica per step",
            "title": "Gradient bytes per replica per step vs number of streams",
        },
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    raise SystemExit(main())
