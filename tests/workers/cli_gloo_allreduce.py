"""A Horovod rank started without horovodrun (docker/entrypoint.sh worker role): allreduce, report.

usage: cli_gloo_allreduce.py OUT_DIR   -> OUT_DIR/rank{R}.json
"""

import json
import os
import sys

import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
summed = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum)
with open(os.path.join(sys.argv[1], f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(
        {
            "rank": hvd.rank(),
            "size": hvd.size(),
            "local_rank": hvd.local_rank(),
            "cross_rank": hvd.cross_rank(),
            "summed": summed.numpy().tolist(),
            "gloo": bool(hvd.gloo_enabled()),
            "hostname": os.environ["HOROVOD_HOSTNAME"],
        },
        f,
    )
