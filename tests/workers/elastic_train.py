"""An elastic Horovod worker (run by horovodrun --min-np/--max-np --host-discovery-script).

Trains the tiny shared-weight model of train_common.py with Adam for ``--steps`` steps. The
global batch of step s is the same whatever the number of workers (each takes its share of
it), so rolling back and re-forming the job changes only who computes a step. Every finished
step is appended to ``OUT/progress-<host>.jsonl`` (pid, rank, size, step, restores) so the test
can see rollbacks and joins; rank 0 writes ``OUT/final.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import train_common as tc  # noqa: E402

from dist_share import elastic  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=60)
p.add_argument("--commit-every", type=int, default=5)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--delay", type=float, default=0.2, help="seconds per step (time to inject faults)")
a = p.parse_args()
out = Path(a.out)

hvd.init()
keras.utils.set_random_seed(0)
spec = tc.build_shared()
model = spec.model
optimizer = keras.optimizers.Adam(0.01)
rng = np.random.default_rng(0)
X = {s: rng.normal(size=(256, tc.IN_DIM)).astype("float32") for s in spec.stream_names}
Y = rng.normal(size=(256,)).astype("float32")


def shard(step: int, rank: int, size: int):
    """This worker's part of global batch ``step``: rows rank, rank+size, ... of it."""
    rows = (np.arange(a.batch) + step * a.batch) % len(Y)
    rows = rows[rank::size]
    return {s: tf.constant(v[rows]) for s, v in X.items()}, tf.constant(Y[rows])


@tf.function(reduce_retracing=True)
def train_step(x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(spec.loss(y, model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    grads = hvd.grouped_allreduce(grads, op=hvd.Average)
    optimizer.apply(grads, model.trainable_variables)
    return hvd.allreduce(loss, op=hvd.Average)


def log(record: dict) -> None:
    host = os.environ.get("HOROVOD_HOSTNAME", "unknown")
    with open(out / f"progress-{host}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# Build the optimizer's slots before the state snapshots them.
optimizer.build(model.trainable_variables)
state = elastic.make_state(model, optimizer, step=0)


def train(state) -> None:
    rank, size = hvd.rank(), hvd.size()
    log({"event": "enter", "pid": os.getpid(), "rank": rank, "size": size, "step": state.step,
         "restores": state.restores})  # fmt: skip
    while state.step < a.steps:
        x, y = shard(state.step, rank, size)
        loss = float(train_step(x, y))
        state.step += 1
        log({"event": "step", "pid": os.getpid(), "rank": rank, "size": size, "step": state.step,
             "loss": loss})  # fmt: skip
        if state.step % a.commit_every == 0:
            state.commit()
        time.sleep(a.delay)


elastic.run(train, state)
checksum = float(sum(np.sum(np.asarray(v.numpy(), np.float64) ** 2) for v in model.weights))
total = float(hvd.allreduce(tf.constant(checksum, tf.float64), op=hvd.Sum))
if hvd.rank() == 0:
    (out / "final.json").write_text(
        json.dumps({"step": state.step, "size": hvd.size(), "checksum": checksum, "sum": total})
    )
