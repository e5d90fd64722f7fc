"""Tiny shared-weight models and data for the strategy/trainer tests (ModelSpec-compatible).

Two families that stress what matters for data parallelism with shared weights:
- ``shared``: one Dense layer applied to three streams (its gradient is the sum of three uses);
- ``two_tower``: one Embedding table read by three id streams (IndexedSlices gradients with
  repeated rows).
The data function follows the data contract: shuffle with the seed, then shard, then batch with
the per-replica batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dist_share.families.build import ModelSpec

STREAMS = {
    "shared": ["a", "b", "c"],
    "shared_bn": ["a", "b", "c"],
    "user_tower": ["a", "b", "c"],
    "user_bn": ["a", "b", "c"],
    "two_tower": ["user", "history", "item"],
}
# Models that couple the rows of a batch, built from the shipped configs as a user runs them:
# {name: (config file, overrides)}. Their data is the config's own source, made small.
CONFIG_MODELS = {
    # the default config as shipped: a conv tower with batch norm, shared by two streams
    "siamese_cfg": ("configs/siamese_digits.yaml", ()),
    # in-batch softmax: every query against the global batch's candidates
    "two_tower_ibs": (
        "configs/two_tower_synthetic.yaml",
        ("model.loss.type=in_batch_softmax", "data.synthetic.positive_fraction=1.0"),
    ),
    # three views through one conv tower with batch norm
    "multiview_bn": ("configs/multiview_digits.yaml", ("model.tower.block.norm=batch",)),
    # single labelled digits, class-balanced batches (4 digits x 2), batch-hard triplets mined
    # in the global batch, through a conv tower with batch norm
    "triplet_mined": (
        "configs/triplet_digits_mined.yaml",
        (
            "training.batch_size=8",
            "data.sampler.classes_per_batch=4",
            "data.sampler.examples_per_class=2",
        ),
    ),
    # ... and the semi-hard rule
    "triplet_semi": (
        "configs/triplet_digits_mined.yaml",
        (
            "model.loss.mining=semi_hard",
            "training.batch_size=8",
            "data.sampler.classes_per_batch=4",
            "data.sampler.examples_per_class=2",
        ),
    ),
    # in-batch softmax without accidental hits and with logQ correction (its estimate is a
    # weight of the model, compared like the others)
    "two_tower_corrected": ("configs/two_tower_retrieval.yaml", ()),
}
CONFIG_EXAMPLES = {"data.train_examples=64", "data.eval_examples=36"}
# SGD step of a run (default: the worker's --lr). The conv towers with batch norm take steep
# first steps from their random start; a small one keeps 5 steps well-conditioned, so float32's
# summation order (one replica or two) stays far below the comparison's tolerance.
LEARNING_RATES = {
    "siamese_cfg": 0.005,
    "multiview_bn": 0.005,
    "triplet_mined": 0.005,
    "triplet_semi": 0.005,
}
NUM_EXAMPLES = 64
VOCAB = 200
IN_DIM = 4


def run_config(**sections: dict):
    """A validated dist_share Config with these sections (the model section is unused: the
    tests' models are built by the functions below)."""
    from dist_share.run.resolve import validate

    return validate({"model": {"family": "siamese"}, **sections})


# The trainer's contract: a model, a per-example loss and metrics, the stream names.
Spec = ModelSpec


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


def make_user_encoder(norm: str = "layer") -> keras.Model:
    """A user's own Keras encoder (functional). With LayerNormalization (per example) a
    replica's shard computes what the same examples do in one process; with BatchNormalization
    the statistics must be taken per stream (folding) and over the global batch (replicas)."""
    x = keras.Input((IN_DIM,))
    h = keras.layers.Dense(6, name="enc_dense")(x)
    if norm == "batch":
        h = keras.layers.BatchNormalization(momentum=0.5, name="enc_bn")(h)
    else:
        h = keras.layers.LayerNormalization(name="enc_norm")(h)
    h = keras.layers.Activation("tanh")(h)
    return keras.Model(
        x,
        keras.layers.Dense(3, name="enc_out")(h),
        name="user_encoder_bn" if norm == "batch" else "user_encoder",
    )


def build_user_tower(norm: str = "layer") -> Spec:
    """The user's encoder shared by the three streams through SharedTower (folded)."""
    from dist_share.model.towers import SharedTower

    names = STREAMS["user_tower"]
    inputs = {s: keras.Input((IN_DIM,), name=s) for s in names}
    tower = SharedTower(make_user_encoder(norm), num_streams=3, name="tower")
    merged = keras.layers.Concatenate(name="concat")(tower([inputs[s] for s in names]))
    out = keras.layers.Dense(1, name="head")(merged)
    model = keras.Model(inputs, out, name="user_bn" if norm == "batch" else "user_tower")
    return Spec(model, squared_error, {}, list(names))


def config_of(name: str):
    """The shipped config of a CONFIG_MODELS entry, with small data."""
    from dist_share.run.resolve import load_config
    from tests.helpers.paths import ROOT

    path, overrides = CONFIG_MODELS[name]
    return load_config(ROOT / path, [*overrides, *sorted(CONFIG_EXAMPLES)])


def _config_builder(name: str) -> Callable[[], Any]:
    def build() -> Any:
        from dist_share.families.build import build_model
        from dist_share.run.inputs import input_specs

        cfg = config_of(name)
        return build_model(cfg.model, input_specs(cfg.data))

    return build


BUILDERS = {
    "shared": build_shared,
    "two_tower": build_two_tower,
    "shared_bn": build_shared_bn,
    "user_tower": build_user_tower,
    "user_bn": lambda: build_user_tower("batch"),
    **{name: _config_builder(name) for name in CONFIG_MODELS},
}


def arrays(family: str, n: int = NUM_EXAMPLES, seed: int = 1) -> tuple[dict, np.ndarray]:
    if family in CONFIG_MODELS:
        from dist_share.run.inputs import load_arrays

        return load_arrays(config_of(family).data, "train")
    rng = np.random.default_rng(seed)
    if family in ("shared", "shared_bn", "user_tower", "user_bn"):
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


def id_split(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Siamese-shaped streams plus an `id` stream (example i has id i) and a bool mask stream:
    the arrays the TFRecord tests convert into shards (tests/data/test_records.py and
    records_shards.py)."""
    rng = np.random.default_rng(seed)
    features = {
        "left": rng.random((n, 8, 8, 1), np.float32),
        "right": rng.random((n, 8, 8, 1), np.float32),
        "id": np.arange(n, dtype=np.int32),
        "mask": rng.random((n, 3)) < 0.5,
    }
    return features, (np.arange(n) % 2).astype(np.float32)


def _reads_as_run(data: Any) -> bool:
    """Whether a config's rows must come as a run reads them: labels that are not the data's
    own (classes of single items, candidate ids) or a class-balanced sampler."""
    return data.labels != "given" or data.sampler.type != "shuffle"


def make_dataset_fn(
    family: str,
    global_batch: int,
    seed: int = 0,
    with_ids: bool = False,
    drop_remainder: bool = True,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    data = config_of(family).data if family in CONFIG_MODELS else None
    if data is not None and _reads_as_run(data):
        from dist_share.run.inputs import make_dataset_fn as run_dataset_fn

        split = "train" if drop_remainder else "eval"
        return run_dataset_fn(data, split, global_batch, seed)
    feats, labels = arrays(family)
    if with_ids:
        feats = {"id": np.arange(len(labels), dtype="int32")}

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        ds = ds.shuffle(len(labels), seed=seed)
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        return ds.batch(ctx.get_per_replica_batch_size(global_batch), drop_remainder=drop_remainder)

    return fn
