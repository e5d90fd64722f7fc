"""Batch-coupled losses and metrics across replicas equal their single-replica values: in-batch
softmax (plain and corrected), mined triplets and pairs, in-batch top-1 and recall@1.

Run as ``python tests/workers/cross_replica_check.py --strategy mirrored --num-cpu-devices 2
--out F`` or under ``horovodrun -np 2 ... --strategy horovod``; writes ``F.rank{R}.json`` with,
per case, the largest difference from the single-replica reference (loss, gradients, metric),
and the loss with per-replica negatives (which must differ: the comparison can fail).
"""

from __future__ import annotations

from typing import Any

from tests.workers.replicas import strategy_from_argv, write_result


def compare(strategy: Any, x: Any, y: Any, sizes: list[int], loss_fn: Any, metric: Any) -> dict:
    """Largest differences between the split computation and the single-replica one, for a
    per-example loss and metric of rows ``x`` with labels ``y`` (replica r holds sizes[r] rows)."""
    import numpy as np
    import tensorflow as tf

    from dist_share.model.cross_replica import local_only

    total = sum(sizes)
    starts = np.cumsum([0, *sizes])

    def objective(rows: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.reduce_sum(loss_fn(labels, rows)) / total, metric(labels, rows)

    with local_only():
        whole = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(whole)
            ref_loss, ref_metric = objective(whole, tf.constant(y))
        ref_grad = tape.gradient(ref_loss, whole).numpy()

    def replica_fn(rows: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape() as tape:
            tape.watch(rows)
            loss, value = objective(rows, labels)
        return loss, value, tape.gradient(loss, rows)

    def part(a: Any, replica: int) -> tf.Tensor:
        return tf.constant(a[starts[replica] : starts[replica + 1]])

    if strategy.name == "horovod":
        r = strategy.rank
        outs, ids = [tf.function(replica_fn)(part(x, r), part(y, r))], [r]
    else:
        tf_strategy = strategy.tf_strategy
        rows, labels = (
            tf_strategy.experimental_distribute_values_from_function(
                lambda ctx, a=a: part(a, ctx.replica_id_in_sync_group)
            )
            for a in (x, y)
        )
        per_replica = tf_strategy.run(tf.function(replica_fn), args=(rows, labels))
        outs = list(zip(*[strategy.local_results(v) for v in per_replica], strict=True))
        ids = list(range(len(outs)))
    local_sum = sum(float(o[0]) for o in outs)
    loss = strategy.allreduce_host_sum({"loss": local_sum})["loss"]
    diffs = {"loss": abs(loss - float(ref_loss)), "grad": 0.0, "metric": 0.0}
    for rid, (_, value, grad) in zip(ids, outs, strict=True):
        rows = slice(starts[rid], starts[rid + 1])
        diffs["grad"] = max(diffs["grad"], float(np.max(np.abs(grad.numpy() - ref_grad[rows]))))
        metric_diff = np.max(np.abs(value.numpy() - ref_metric.numpy()[rows]))
        diffs["metric"] = max(diffs["metric"], float(metric_diff))
    return diffs


def frequency_layer(strategy: Any, vocab: int) -> Any:
    """A CandidateFrequency whose estimate says id i is in a batch every i + 1 steps."""
    import numpy as np

    from dist_share.model.sampling import CandidateFrequency

    scope = strategy.tf_strategy.scope() if strategy.name != "horovod" else None
    with scope or _nothing():
        layer = CandidateFrequency(vocab, name="frequency")
        layer.build()
    layer.interval.assign(np.arange(1, vocab + 1, dtype=np.float32))
    return layer


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


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

    from dist_share.model.losses import ContrastiveLoss, InBatchSoftmaxLoss, TripletLoss
    from dist_share.model.metrics import InBatchRecallAt1, InBatchTop1

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
        loss_fn = InBatchSoftmaxLoss(temperature=0.5, negatives=negatives)
        labels = np.zeros(sum(sizes), np.float32)
        result["cases"][case] = compare(strategy, pairs, labels, sizes, loss_fn, InBatchTop1())

    # Mined triplets and pairs: every class has rows on both replicas, so an anchor's hardest
    # positive and negative are often on the other one.
    sizes = [6] + [6] * (replicas - 1)
    embeddings = rng.normal(size=(sum(sizes), 4)).astype(np.float32)
    classes = np.arange(sum(sizes)) % 3
    for case, loss_fn in {
        "batch_hard": TripletLoss(margin=1.0, mining="batch_hard"),
        "semi_hard": TripletLoss(margin=1.0, mining="semi_hard"),
        "contrastive_batch_hard": ContrastiveLoss(margin=1.0, mining="batch_hard"),
    }.items():
        result["cases"][case] = compare(
            strategy, embeddings, classes, sizes, loss_fn, InBatchRecallAt1()
        )

    # Corrected in-batch softmax: each replica's positive ids recur on the other replica.
    sizes = [4] * replicas
    pairs = rng.normal(size=(sum(sizes), 2, 5)).astype(np.float32)
    ids = np.tile(np.arange(4), replicas).astype(np.int32)
    corrected = InBatchSoftmaxLoss(
        temperature=0.5, remove_accidental_hits=True, logq_correction=True
    )
    corrected.frequency = frequency_layer(strategy, 8)
    result["cases"]["corrected"] = compare(strategy, pairs, ids, sizes, corrected, InBatchTop1())
    replica_of = np.repeat(np.arange(replicas), sizes)
    elsewhere = (ids[:, None] == ids[None, :]) & (replica_of[:, None] != replica_of[None, :])
    result["masked_elsewhere"] = int(elsewhere.sum())

    result["random_loss"] = random_embedding_loss(strategy)

    write_result(out, strategy, result)


if __name__ == "__main__":
    main()
