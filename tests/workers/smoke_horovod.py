"""Horovod smoke check: allreduce and broadcast_variables on the raw Horovod API.

Run by train_worker.py inside the shared horovodrun and mpirun launches
(tests/helpers/train_jobs.py), so the check costs no TensorFlow and Horovod start of its own;
tests/integration/test_smoke.py reads the result.
"""

from __future__ import annotations

from typing import Any


def check(hvd: Any) -> dict:
    """Sum and average across ranks, and rank 0's variable broadcast to every rank."""
    import tensorflow as tf

    rank, size = hvd.rank(), hvd.size()
    summed = hvd.allreduce(tf.constant([float(rank + 1), 10.0 * (rank + 1)]), op=hvd.Sum)
    averaged = hvd.allreduce(tf.constant(float(rank)), op=hvd.Average)
    # Each rank starts from different values; after the broadcast all must hold rank 0's.
    variable = tf.Variable(tf.fill([3], float(rank) + 0.5))
    hvd.broadcast_variables([variable], root_rank=0)
    return {
        "rank": rank,
        "size": size,
        "summed": summed.numpy().tolist(),
        "averaged": float(averaged.numpy()),
        "variable": variable.numpy().tolist(),
        "gloo": bool(hvd.gloo_enabled()),
        "mpi": bool(hvd.mpi_enabled()),
    }
