"""Horovod smoke worker: allreduce and broadcast_variables, results written per rank as JSON."""

import json
import sys

import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
rank, size = hvd.rank(), hvd.size()

summed = hvd.allreduce(tf.constant([float(rank + 1), 10.0 * (rank + 1)]), op=hvd.Sum)
averaged = hvd.allreduce(tf.constant(float(rank)), op=hvd.Average)

# Each rank starts from different values; after the broadcast all must hold rank 0's.
variable = tf.Variable(tf.fill([3], float(rank) + 0.5))
hvd.broadcast_variables([variable], root_rank=0)

with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(
        {
            "rank": rank,
            "size": size,
            "summed": summed.numpy().tolist(),
            "averaged": float(averaged.numpy()),
            "variable": variable.numpy().tolist(),
            "gloo": bool(hvd.gloo_enabled()),
            "mpi": bool(hvd.mpi_enabled()),
        },
        f,
    )
