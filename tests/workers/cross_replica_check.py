"""Batch-coupled losses and metrics across replicas equal their single-replica values.

Run as ``python tests/workers/cross_replica_check.py --strategy mirrored --num-cpu-devices 2
--out F`` or under ``horovodrun -np 2 ... --strategy horovod``; writes ``F.rank{R}.json`` with,
per case, the largest difference from the single-replica reference (loss, gradients, metric),
and the loss with per-replica negatives (which must differ: the comparison can fail).
"""

from __future__ import annotations

from typing import Any

from tests.workers.replicas import strategy_from_argv, write_result


def compare(strategy: Any, pairs: Any, sizes: list[int], negatives: str) -> dict:
    """Largest differences between the split computation and the single-replica one."""
    import numpy as np
    import tensorflow as tf

    from dist_share.model.cross_replica import local_only
    from dist_share.model.losses import InBatchSoftmaxLoss
    from dist_share.model.metrics import InBatchTop1

    total = sum(sizes)
    starts = np.cumsum([0, *sizes])
    loss_fn = InBatchSoftmaxLoss(temperature=0.5, negatives=negatives)
    top1 = InBatchTop1()

    def objective(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.reduce_sum(loss_fn(None, x)) / total, top1(None, x)

    with local_only():
        x = tf.constant(pairs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            ref_loss, ref_top1 = objective(x)
        ref_grad = tape.gradient(ref_loss, x).numpy()

    def replica_fn(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(rows)
            loss, hit = objective(rows)
        return loss, hit, tape.gradient(loss, rows)

    def rows_of(replica: int) -> tf.Tensor:
        return tf.constant(pairs[starts[replica] : starts[replica + 1]])

    if strategy.name == "horovod":
        outs, ids = [tf.function(replica_fn)(rows_of(strategy.rank))], [strategy.rank]
    else:
        tf_strategy = strategy.tf_strategy
        values = tf_strategy.experimental_distribute_values_from_function(
            lambda ctx: rows_of(ctx.replica_id_in_sync_group)
        )
        per_replica = tf_strategy.run(tf.function(replica_fn), args=(values,))
        outs = list(zip(*[strategy.local_results(v) for v in per_replica], strict=True))
        ids = list(range(len(outs)))
    local_sum = sum(float(o[0]) for o in outs)
    loss = strategy.allreduce_host_sum({"loss": local_sum})["loss"]
    diffs = {"loss": abs(loss - float(ref_loss)), "grad": 0.0, "top1": 0.0}
    for rid, (_, hit, grad) in zip(ids, outs, strict=True):
        rows = slice(starts[rid], starts[rid + 1])
        diffs["grad"] = max(diffs["grad"], float(np.max(np.abs(grad.numpy() - ref_grad[rows]))))
        top1_diff = np.max(np.abs(hit.numpy() - ref_top1.numpy()[rows]))
        diffs["top1"] = max(diffs["top1"], float(top1_diff))
    return diffs


def random_embedding_loss(strategy: Any, rows: int = 32, dim: int = 512) -> dict:
    """The in-batch loss at temperature 1 on random unit vectors (nearly orthogonal, so every
    candidate scores about the same): about log(number of candidates a query sees)."""
    import numpy as np
    import tensorflow as tf

    from dist_share.model.losses import InBatchSoftmaxLoss

    def mean_loss(negatives: str) -> float:
        rng = np.random.default_rng(strategy.rank)
        losses = []
        for _ in range(strategy.num_replicas if strategy.name != "horovod" else 1):
            x = rng.normal(size=(rows, 2, dim)).astype(np.float32)
            losses.append(x / np.linalg.norm(x, axis=-1, keepdims=True))
        fn = InBatchSoftmaxLoss(temperature=1.0, negatives=negatives)
        step = tf.function(lambda x: tf.reduce_mean(fn(None, x)))
        if strategy.name == "horovod":
            local = [float(step(tf.constant(losses[0])))]
        else:
            values = strategy.tf_strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(losses[ctx.replica_id_in_sync_group])
            )
            local = [float(v) for v in strategy.local_results(strategy.run(step, (values,)))]
        total = strategy.allreduce_host_sum({"loss": sum(local)})["loss"]
        return total / strategy.num_replicas

    return {
        "global": mean_loss("global"),
        "local": mean_loss("local"),
        "global_batch": rows * strategy.num_replicas,
        "replica_batch": rows,
    }


def main() -> None:
    strategy, out = strategy_from_argv()

    import numpy as np

    replicas = strategy.num_replicas
    rng = np.random.default_rng(0)
    result: dict = {"num_replicas": replicas, "cases": {}}
    cases = {
        "even": ([4] * replicas, "global"),
        # eval's last batch: replica r holds sizes[r] rows
        "uneven": ([3, 1] + [2] * (replicas - 2), "global"),
        "even_local_negatives": ([4] * replicas, "local"),
    }
    for case, (sizes, negatives) in cases.items():
        pairs = rng.normal(size=(sum(sizes), 2, 5)).astype(np.float32)
        pairs /= np.linalg.norm(pairs, axis=-1, keepdims=True)
        result["cases"][case] = compare(strategy, pairs, sizes, negatives)

    result["random_loss"] = random_embedding_loss(strategy)

    write_result(out, strategy, result)


if __name__ == "__main__":
    main()
