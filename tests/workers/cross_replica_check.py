"""Batch-coupled losses and metrics across replicas equal their single-replica values.

Run as ``python tests/workers/cross_replica_check.py --strategy mirrored --num-cpu-devices 2
--out F`` or under ``horovodrun -np 2 ... --strategy horovod``; writes ``F.rank{R}.json`` with,
per case, the largest difference from the single-replica reference (loss, gradients, metric).
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--num-cpu-devices", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name=a.strategy, num_cpu_devices=a.num_cpu_devices))

    import numpy as np
    import tensorflow as tf

    from dist_share.model.cross_replica import local_only
    from dist_share.model.losses import InBatchSoftmaxLoss
    from dist_share.model.metrics import InBatchTop1

    replicas = strategy.num_replicas
    rng = np.random.default_rng(0)
    result: dict = {"num_replicas": replicas, "cases": {}}
    # Uneven split (eval's last batch): replica r holds sizes[r] rows.
    for case, sizes in (("even", [4] * replicas), ("uneven", [3, 1] + [2] * (replicas - 2))):
        total = sum(sizes)
        pairs = rng.normal(size=(total, 2, 5)).astype(np.float32)
        pairs /= np.linalg.norm(pairs, axis=-1, keepdims=True)
        loss_fn = InBatchSoftmaxLoss(temperature=0.5)
        top1 = InBatchTop1()

        def objective(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            per_example = loss_fn(None, x)
            return tf.reduce_sum(per_example) / total, top1(None, x)

        with local_only():
            x = tf.constant(pairs)
            with tf.GradientTape() as tape:
                tape.watch(x)
                ref_loss, ref_top1 = objective(x)
            ref_grad = tape.gradient(ref_loss, x).numpy()

        starts = np.cumsum([0, *sizes])

        def replica_fn(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(rows)
                loss, hit = objective(rows)
            return loss, hit, tape.gradient(loss, rows)

        if a.strategy == "horovod":
            r = strategy.rank
            outs = [replica_fn(tf.constant(pairs[starts[r] : starts[r + 1]]))]
            ids = [r]
        else:
            tf_strategy = strategy.tf_strategy
            values = tf_strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    pairs[
                        starts[ctx.replica_id_in_sync_group] : starts[
                            ctx.replica_id_in_sync_group + 1
                        ]
                    ]
                )
            )
            per_replica = tf_strategy.run(tf.function(replica_fn), args=(values,))
            outs = list(zip(*[strategy.local_results(v) for v in per_replica], strict=True))
            ids = list(range(len(outs)))
        loss_parts = [float(o[0]) for o in outs]
        loss_total = float(strategy.allreduce_host_sum({"loss": sum(loss_parts)})["loss"])
        diffs = {"loss": abs(loss_total - float(ref_loss))}
        grad_diff = top1_diff = 0.0
        for rid, (_, hit, grad) in zip(ids, outs, strict=True):
            rows = slice(starts[rid], starts[rid + 1])
            grad_diff = max(grad_diff, float(np.max(np.abs(grad.numpy() - ref_grad[rows]))))
            top1_diff = max(top1_diff, float(np.max(np.abs(hit.numpy() - ref_top1.numpy()[rows]))))
        diffs.update(grad=grad_diff, top1=top1_diff, ref_loss=float(ref_loss))
        # The same loss with per-replica negatives differs: the check can fail.
        result["cases"][case] = diffs

    out = f"{a.out}.rank{strategy.rank}.json"
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
