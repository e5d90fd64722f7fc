"""Tiny shared-weight models and data for the strategy/trainer tests (ModelSpec-compatible).

Two families that stress what matters for data parallelism with shared weights:
- ``shared``: one Dense layer applied to three streams (its gradient is the sum of three uses);
- ``two_tower``: one Embedding table read by three id streams (IndexedSlices gradients with
  repeated rows).
The data function follows the data contract: shuffle with the seed, then shard, then batch with
the per-replica batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

STREAMS = {
    "shared": ["a", "b", "c"],
    "shared_bn": ["a", "b", "c"],
    "two_tower": ["user", "history", "item"],
}
NUM_EXAMPLES = 64
VOCAB = 200
IN_DIM = 4


def run_config(**sections: dict):
    """A validated dist_share Config with these sections (the model section is unused: the
    tests' models are built by the functions below)."""
    from dist_share.config import validate

    return validate({"model": {"family": "siamese"}, **sections})


@dataclasses.dataclass
class Spec:
    model: keras.Model
    loss: Callable
    metrics: dict
    stream_names: list


def squared_error(y, pred):
    return tf.square(tf.cast(y, pred.dtype) - tf.reshape(pred, [-1]))


def logistic_loss(y, logit):
    logit = tf.reshape(logit, [-1])
    return tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(y, logit.dtype), logit)


def abs_error(y, pred):
    return tf.abs(tf.cast(y, pred.dtype) - tf.reshape(pred, [-1]))


def build_shared() -> Spec:
    inputs = {s: keras.Input((IN_DIM,), name=s) for s in STREAMS["shared"]}
    shared = keras.layers.Dense(3, activation="tanh", name="shared")
    merged = keras.layers.Concatenate(name="concat")([shared(inputs[s]) for s in STREAMS["shared"]])
    out = keras.layers.Dense(1, name="head")(merged)
    model = keras.Model(inputs, out, name="shared_tower")
    return Spec(model, squared_error, {"mae": abs_error}, list(STREAMS["shared"]))


def build_two_tower() -> Spec:
    user = keras.Input((), dtype="int32", name="user")
    history = keras.Input((3,), dtype="int32", name="history")
    item = keras.Input((), dtype="int32", name="item")
    init = keras.initializers.RandomNormal(stddev=0.5)
    table = keras.layers.Embedding(VOCAB, 4, embeddings_initializer=init, name="table")
    hist = keras.layers.GlobalAveragePooling1D(name="hist_mean")(table(history))
    query = keras.layers.Concatenate(name="q_concat")([table(user), hist])
    query = keras.layers.Dense(4, name="query_proj")(query)
    score = keras.layers.Dot(axes=1, name="score")([query, table(item)])
    model = keras.Model({"user": user, "history": history, "item": item}, score, name="two_tower")
    return Spec(model, logistic_loss, {}, list(STREAMS["two_tower"]))


def build_shared_bn() -> Spec:
    """Shared Dense + BatchNormalization: moving statistics that each replica updates locally."""
    inputs = {s: keras.Input((IN_DIM,), name=s) for s in STREAMS["shared"]}
    shared = keras.layers.Dense(3, name="shared")
    norm = keras.layers.BatchNormalization(momentum=0.5, name="norm")
    merged = keras.layers.Concatenate(name="concat")(
        [norm(shared(inputs[s])) for s in STREAMS["shared"]]
    )
    out = keras.layers.Dense(1, name="head")(merged)
    model = keras.Model(inputs, out, name="shared_bn")
    return Spec(model, squared_error, {}, list(STREAMS["shared"]))


BUILDERS = {"shared": build_shared, "two_tower": build_two_tower, "shared_bn": build_shared_bn}


def arrays(family: str, n: int = NUM_EXAMPLES, seed: int = 1) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    if family in ("shared", "shared_bn"):
        feats = {s: rng.normal(size=(n, IN_DIM)).astype("float32") for s in STREAMS["shared"]}
        labels = rng.normal(size=(n,)).astype("float32")
    else:
        # A few popular ids so that rows repeat across streams and examples.
        pop = rng.integers(0, VOCAB, size=6)
        feats = {
            "user": rng.choice(pop, size=n).astype("int32"),
            "history": rng.choice(pop, size=(n, 3)).astype("int32"),
            "item": rng.choice(pop, size=n).astype("int32"),
        }
        labels = rng.integers(0, 2, size=(n,)).astype("float32")
    return feats, labels


def make_dataset_fn(
    family: str,
    global_batch: int,
    seed: int = 0,
    with_ids: bool = False,
    drop_remainder: bool = True,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    feats, labels = arrays(family)
    if with_ids:
        feats = {"id": np.arange(len(labels), dtype="int32")}

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        ds = ds.shuffle(len(labels), seed=seed)
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=drop_remainder)

    return fn
