"""RecordSource: shard files opened and checked against their manifests, which files and records
each input pipeline reads, and its ``dataset_fn`` (exact resume at a step included).

Sharding across pipelines, batch semantics and resuming are described in docs/DATA.md.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dist_share.data.records.codec import check_example, parse_fn
from dist_share.data.records.diagnosis import explain, find_unreadable_file
from dist_share.data.records.manifest import MANIFEST_NAME, Manifest, ShardInfo, describe_streams
from dist_share.data.records.reader import PipelinePlan, iter_records, serialized_records
from dist_share.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 10_000
DEFAULT_CYCLE_LENGTH = 8

_logged_once: set[str] = set()


def _log_once(key: str, msg: str, *args: Any) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        log.warning(msg, *args)


def _expand(
    patterns: str | os.PathLike | Sequence[str | os.PathLike], split: str | None
) -> list[str]:
    from tensorflow.io import gfile

    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for p in patterns:
        p = str(p)
        if gfile.isdir(p):
            manifest = Manifest.load(os.path.join(p, MANIFEST_NAME))
            names = [s.file for s in manifest.shards if split is None or s.split == split]
            if not names:
                raise DataError(
                    f"{p}: the manifest lists no {split!r} shards (splits: {manifest.splits()})"
                )
            files += [os.path.join(p, n) for n in names]
        elif globlib.has_magic(p):
            matched = sorted(gfile.glob(p))
            if not matched:
                raise DataError(f"{p!r} matches no file")
            files += matched
        else:
            if not gfile.exists(p):
                raise DataError(f"{p}: no such file")
            files.append(p)
    if not files:
        raise DataError("no shard files given")
    seen: set[str] = set()
    dupes = [f for f in files if f in seen or seen.add(f)]  # type: ignore[func-returns-value]
    if dupes:
        raise DataError(f"{dupes[0]} is given twice (overlapping patterns?)")
    return sorted(files)


class RecordSource:
    """Sharded TFRecord files plus their manifest, opened and checked; makes dataset functions.

    Build one with :meth:`open`. Files are kept sorted by path, which is the order the file
    sharding uses on every worker.
    """

    def __init__(self, files: Sequence[str], manifest: Manifest, shards: Sequence[ShardInfo]):
        self.files = tuple(files)
        self.manifest = manifest
        self.shards = tuple(shards)

    @classmethod
    def open(
        cls,
        patterns: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        split: str | None = None,
        family: str | None = None,
        check_records: bool = True,
    ) -> RecordSource:
        """Resolve files (paths, globs, or shard directories) and check them against manifests.

        Args:
            patterns: a file, a glob (``data/train-*.tfrecord``), a directory (its manifest's
                shards of `split`), or a list of these.
            split: for directories: which split's shards.
            family: when given, the manifest's family must be this one.
            check_records: read the first record of every file and check it against the
                manifest (one small read per file).

        Raises:
            DataError: no file matches; a file has no manifest beside it or is not listed in
                it; manifests of different directories disagree; a file's size differs from the
                manifest's (truncated or rewritten); a first record does not match; the family
                differs.
        """
        from tensorflow.io import gfile

        files = _expand(patterns, split)
        manifests: dict[str, Manifest] = {}
        shards: list[ShardInfo] = []
        for path in files:
            directory = os.path.dirname(path) or "."
            if directory not in manifests:
                mpath = os.path.join(directory, MANIFEST_NAME)
                if not gfile.exists(mpath):
                    raise DataError(
                        f"{path}: no {MANIFEST_NAME} beside it: not written by "
                        "`dist-share data convert`, or the conversion did not finish"
                    )
                manifests[directory] = Manifest.load(mpath)
            manifest = manifests[directory]
            info = manifest.shard(os.path.basename(path))
            if info is None:
                raise DataError(
                    f"{path}: not listed in {manifest.path} (a file left from another "
                    "conversion? the manifest lists "
                    f"{[s.file for s in manifest.shards][:6]}{'...' if len(manifest.shards) > 6 else ''})"
                )
            size = gfile.stat(path).length
            if size != info.bytes:
                raise DataError(
                    f"{path}: {size} bytes but {manifest.path} records {info.bytes}: the file "
                    "is truncated or was rewritten after the conversion"
                )
            shards.append(info)
        first = next(iter(manifests.values()))
        for m in manifests.values():
            if (m.streams, m.label, m.compression) != (
                first.streams,
                first.label,
                first.compression,
            ):
                raise DataError(
                    f"{m.path} describes {describe_streams(m.streams, m.label)} ({m.compression or 'uncompressed'}) "
                    f"but {first.path} describes {describe_streams(first.streams, first.label)} "
                    f"({first.compression or 'uncompressed'}); one source needs one record format"
                )
            if family is not None and m.family not in (None, family):
                raise DataError(f"{m.path} holds {m.family} data, expected {family} data")
        source = cls(files, first, shards)
        if check_records:
            for path, info in zip(files, shards, strict=True):
                record = next(iter_records(path, first.compression), None)
                if record is None:
                    if info.examples:
                        raise DataError(
                            f"{path}: empty but {manifests[os.path.dirname(path) or '.'].path} "
                            f"records {info.examples} examples"
                        )
                    continue
                check_example(record, first, f"{path}, record 0")
        return source

    # -- facts ---------------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return sum(s.examples for s in self.shards)

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        return self.manifest.input_specs()

    def plan(
        self, ctx: tf.distribute.InputContext | None = None, sharding: str = "auto"
    ) -> PipelinePlan:
        """Which files input pipeline ``ctx.input_pipeline_id`` reads, how, and how many examples.

        Args:
            ctx: the pipeline's input context (None: the only pipeline).
            sharding: ``file``: pipeline i of n reads ``files[i::n]`` (needs at least n files);
                ``example``: every pipeline reads every file and keeps every n-th record;
                ``auto``: by file when there are at least n files and they split evenly (the
                pipelines' example counts within 10% of each other), otherwise by example,
                which is logged once. Uneven file shares would make the pipelines' epochs
                differ in length, so that the examples of the smaller shares are seen more
                often in a synchronous job.

        Raises:
            DataError: ``sharding: file`` with fewer files than pipelines; an unknown mode.
        """
        n = ctx.num_input_pipelines if ctx is not None else 1
        i = ctx.input_pipeline_id if ctx is not None else 0
        if sharding not in ("auto", "file", "example"):
            raise DataError(f"sharding is {sharding!r}, expected auto, file or example")
        shares = [sum(s.examples for s in self.shards[k::n]) for k in range(n)]
        if sharding == "file" and len(self.files) < n:
            raise DataError(
                f"sharding by file needs at least one file per input pipeline: "
                f"{len(self.files)} files for {n} pipelines"
            )
        even = len(self.files) >= n and min(shares) >= 0.9 * max(shares)
        if sharding == "file" or (sharding == "auto" and even):
            mine = tuple(range(i, len(self.files), n))
            return PipelinePlan(mine, False, n, i, shares[i])
        if sharding == "auto":
            why = (
                f"{len(self.files)} shard files for {n} input pipelines"
                if len(self.files) < n
                else f"{len(self.files)} shard files do not split evenly over {n} input "
                f"pipelines (by file they would get {min(shares)} to {max(shares)} examples "
                "per epoch, and the smaller shares would be seen more often)"
            )
            _log_once(
                f"by-example:{self.files}:{n}",
                "%s: sharding by example instead (every pipeline reads all files and keeps "
                "one record in %d). Convert into a multiple of %d shards so that each worker "
                "reads only its own files.",
                why,
                n,
                n,
            )
        total = self.num_examples
        return PipelinePlan(tuple(range(len(self.files))), True, n, i, len(range(i, total, n)))

    # -- tf.data -------------------------------------------------------------------------------
    def dataset_fn(
        self,
        global_batch_size: int,
        *,
        training: bool,
        seed: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        start_step: int = 0,
        cycle_length: int = DEFAULT_CYCLE_LENGTH,
        sharding: str = "auto",
    ) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
        """A ``dataset_fn`` for ``distribute_datasets_from_function`` (or called with no context).

        Args:
            global_batch_size: examples per step over all replicas; each pipeline batches
                ``ctx.get_per_replica_batch_size(global_batch_size)``.
            training: True: shuffled (per-epoch file order and a record shuffle buffer),
                repeated forever, batches with drop_remainder. False: one pass in file order,
                the partial last batch kept, so that every example is evaluated once.
            seed: the shuffle seed (file orders and buffers of every epoch derive from it).
            shuffle_buffer: records held for shuffling per pipeline.
            start_step: training only: begin where step `start_step` of a run with the same
                seed, global batch and number of pipelines and replicas would be (exact resume).
            cycle_length: files read concurrently per pipeline.
            sharding: ``auto``, ``file`` or ``example``: see :meth:`plan`.

        Raises:
            DataError: (when called) a training pipeline would get no examples.
        """
        import tensorflow as tf

        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        parse = parse_fn(self.files, self.manifest)
        compression = self.manifest.compression

        def dataset_fn(ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
            ctx = ctx or tf.distribute.InputContext()
            plan = self.plan(ctx, sharding)
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            if training:
                if plan.epoch_examples == 0:
                    raise DataError(
                        f"input pipeline {plan.pipeline_id} of {plan.num_pipelines} has no "
                        f"training examples (its files: {[self.files[f] for f in plan.files]})"
                    )
                per_pipeline = max(1, ctx.num_replicas_in_sync // max(1, ctx.num_input_pipelines))
                consumed = int(start_step) * per_pipeline * per_replica
                first_epoch, offset = divmod(consumed, plan.epoch_examples)
                ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
                    lambda e: serialized_records(
                        self.files, compression, plan, e, seed, shuffle_buffer, cycle_length
                    )
                )
                ds = ds.skip(offset).batch(per_replica, drop_remainder=True)
            else:
                ds = serialized_records(self.files, compression, plan, None, seed, 0, cycle_length)
                ds = ds.batch(per_replica)
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            options = tf.data.Options()
            # Sharding is done above, per file or per record; tf.distribute must not redo it.
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

        return dataset_fn

    # -- errors --------------------------------------------------------------------------------
    def explain(self, error: BaseException) -> DataError | None:
        """The DataError behind a TensorFlow error raised while streaming this source, or None
        (see :func:`~dist_share.data.records.diagnosis.explain`)."""
        return explain(error, self.files, self.manifest)

    def find_unreadable_file(self) -> tuple[str, str] | None:
        """The first file TensorFlow cannot stream to the end (and why), or None."""
        return find_unreadable_file(self.files, self.manifest.compression)

    @contextlib.contextmanager
    def errors_as_data_errors(self) -> Iterator[None]:
        """Re-raise TensorFlow errors that :meth:`explain` understands as a short DataError."""
        try:
            yield
        except Exception as e:
            explained = self.explain(e)
            if explained is None:
                raise
            raise explained from None

    def validate(self) -> int:
        """Stream and parse every record of every file (one pass); return the record count.

        Raises:
            DataError: the first bad file or record, named; or a file whose record count differs
                from its manifest's.
        """
        import tensorflow as tf

        parse = parse_fn(self.files, self.manifest)
        total = 0
        for f, (path, info) in enumerate(zip(self.files, self.shards, strict=True)):
            plan = PipelinePlan((f,), False, 1, 0, info.examples)
            ds = serialized_records(self.files, self.manifest.compression, plan, None, 0, 0, 1)
            ds = ds.batch(1024).map(parse)
            count = 0
            with self.errors_as_data_errors():
                for _, labels in ds:
                    count += int(tf.shape(labels)[0])
            if count != info.examples:
                raise DataError(
                    f"{path}: holds {count} records but "
                    f"{os.path.join(os.path.dirname(path), MANIFEST_NAME)} records {info.examples}"
                )
            total += count
        return total
