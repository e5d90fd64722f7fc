"""Dataset functions: in-memory arrays shuffled before sharding, resumed training input, element checks.

Shuffling with the training seed before sharding, then batching per replica, makes the union of
the replicas' batches at step k exactly the global batch k of a single-process run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.data.balanced import ClassBalancedBatches
from dist_share.data.types import DatasetFn
from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf


def arrays_dataset_fn(
    feats: Mapping[str, np.ndarray],
    labels: np.ndarray,
    split: str,
    global_batch_size: int,
    seed: int,
    shuffle_buffer: int,
    balanced: ClassBalancedBatches | None = None,
) -> DatasetFn:
    """A ``dataset_fn`` over in-memory examples (also callable with no input context).

    Train: shuffled with ``seed`` (reshuffled each epoch, same order in every process), or drawn
    by ``balanced`` (class-balanced global batches), repeated forever, sharded, batched per
    replica with drop_remainder. Eval: one pass, in order, sharded, partial last batch kept so
    that every example is evaluated once.
    """
    import tensorflow as tf

    n = len(labels)

    def balanced_rows() -> tf.data.Dataset:
        def draw(b: tf.Tensor) -> tf.Tensor:
            rows = tf.numpy_function(balanced, [b], tf.int64, stateful=False)
            return tf.ensure_shape(rows, [global_batch_size])

        table = (tf.nest.map_structure(tf.constant, dict(feats)), tf.constant(labels))
        rows = tf.data.Dataset.range(np.iinfo(np.int64).max).map(draw).unbatch()
        return rows.map(lambda i: tf.nest.map_structure(lambda t: tf.gather(t, i), table))

    def dataset_fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        ctx = ctx or tf.distribute.InputContext()
        if split == "train" and balanced is not None:
            ds = balanced_rows()
        elif split == "train":
            ds = tf.data.Dataset.from_tensor_slices((dict(feats), labels))
            buffer = min(n, int(shuffle_buffer))
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
        else:
            ds = tf.data.Dataset.from_tensor_slices((dict(feats), labels))
        if ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        ds = ds.batch(per_replica, drop_remainder=split == "train")
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def labels_from_stream(dataset_fn: DatasetFn, stream: str) -> DatasetFn:
    """``dataset_fn`` whose labels are the values of ``stream`` (two-tower candidate ids);
    what it carries (its shards, `starting_at`) is kept."""

    def fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        return dataset_fn(ctx).map(lambda features, _: (features, features[stream]))

    if getattr(dataset_fn, "source", None) is not None:
        fn.source = dataset_fn.source  # type: ignore[attr-defined]
    starting_at = getattr(dataset_fn, "starting_at", None)
    if starting_at is not None:
        fn.starting_at = lambda step: labels_from_stream(starting_at(step), stream)  # type: ignore[attr-defined]
    return fn


def check_element_spec(element_spec: Any, stream_names: Sequence[str]) -> None:
    """Dataset elements must be ``(features, labels)`` with exactly the model's streams."""
    features = element_spec[0] if isinstance(element_spec, tuple) else element_spec
    if not isinstance(features, Mapping):
        raise DataError(f"dataset elements must be (features_dict, labels), got {element_spec}")
    names = set(stream_names)
    missing, extra = names - set(features), set(features) - names
    if missing or extra:
        raise DataError(
            f"dataset streams do not match the model: missing {sorted(missing)}, extra {sorted(extra)}"
        )


def train_input(dataset_fn: DatasetFn, start_step: int, stream_names: Sequence[str]) -> DatasetFn:
    """The training input of a run resumed at ``start_step``: checked, repeated, and advanced
    past what the run already consumed.

    Skipping is per input pipeline: one pipeline feeds num_replicas / num_pipelines replicas.
    """

    starting_at = getattr(dataset_fn, "starting_at", None)
    if starting_at is not None and start_step:
        # A source that can start at a step itself (TFRecord shards: it jumps to the epoch and
        # skips serialized records instead of replaying and parsing every batch since step 0).
        dataset_fn, start_step = starting_at(start_step), 0

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = dataset_fn(ctx)
        check_element_spec(ds.element_spec, stream_names)
        ds = ds.repeat()
        per_pipeline = max(1, ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines))
        return ds.skip(start_step * per_pipeline) if start_step else ds

    return fn


def explain_input_error(error: BaseException, *dataset_fns: Any) -> DataError | None:
    """A short DataError (file, record, stream) for a TensorFlow error raised while streaming
    the shards behind `dataset_fns` (None when it is not about them)."""
    for fn in dataset_fns:
        source = getattr(fn, "source", None)
        if source is not None:
            explained = source.explain(error)
            if explained is not None:
                return explained
    return None
