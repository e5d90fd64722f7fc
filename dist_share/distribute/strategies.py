"""Where replicas live: one small protocol, a tf.distribute and a Horovod implementation.

The trainer is written once against `Strategy`. tf.distribute strategies run a replica function
per device and all-reduce inside the step; Horovod runs one replica per process and all-reduces
with its own collectives. What differs between them (how data is sharded, how gradients and
metrics are reduced, who is chief, how the initial state is made identical) is here and in
`gradients.py`, nowhere else, and what a caller must know about the difference is an attribute
(`gradient_op`, `logs_are_per_process`, ...), never a check of the strategy's name.

Horovod is imported only when the ``horovod`` strategy is built. Finding the cluster a
multi-worker job runs in (TF_CONFIG from MPI, Slurm or horovodrun) is `cluster.py`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tensorflow as tf

from dist_share.config.schema import STRATEGIES, StrategyConfig
from dist_share.data.types import DatasetFn
from dist_share.distribute.cluster import discover_tf_config
from dist_share.distribute.devices import NodeSlot, node_slot, place, prefetch_device
from dist_share.distribute.gradients import GradientOptions, reduce_gradients
from dist_share.errors import ConfigError
from dist_share.model.cross_replica import CollectiveGroup, set_process_group


def tf_variables(variables: list[Any]) -> list[tf.Variable]:
    """Keras 3 variables wrap a tf.Variable; Horovod's ops need the tf.Variable (``.value``)."""
    return [v if isinstance(v, tf.Variable) else getattr(v, "value", v) for v in variables]


class Strategy:
    """What the training loops need from a distribution strategy.

    The defaults describe one replica per process, run directly in the caller's context (the
    local and Horovod cases); `TFDistributeStrategy` overrides them with tf.distribute's.

    Attributes:
        name: the ``strategy.name`` it was built from.
        gradient_options: how gradients are prepared and reduced (`gradients.GradientOptions`).
        gradient_op: 'sum' if the loss is divided by the global batch (replicas' gradients are
            summed), 'average' if by the replica batch (Horovod with ``op: average``).
        logs_are_per_process: Keras ``fit`` logs hold this process's numbers only, so they
            must be averaged over processes before they are written (Horovod).
        fit_logs_need_rank: Keras 3 reduces ``fit`` logs across workers with
            ``reduce(MEAN, axis=0)``, which fails on scalars (MultiWorkerMirrored).
        prefetch_to_device: copy batches to this process's GPU ahead of the step
            (``strategy.prefetch_to_device``; tf.distribute strategies always do).
    """

    name: str = ""
    gradient_op: str = "sum"
    logs_are_per_process: bool = False
    fit_logs_need_rank: bool = False
    gradient_backend: str = "none"
    prefetch_to_device: bool = True

    def __init__(self, options: GradientOptions) -> None:
        self.gradient_options = options

    # -- identity ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's index among the job's processes."""
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return 1

    @property
    def num_replicas(self) -> int:
        """Number of replicas across all processes (devices x processes)."""
        return self.world_size

    @property
    def is_chief(self) -> bool:
        """The one process that logs, writes checkpoints and exports."""
        return self.rank == 0

    def scope(self) -> contextlib.AbstractContextManager:
        """Where model and optimizer variables must be created."""
        return contextlib.nullcontext()

    # -- data -----------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: DatasetFn) -> Any:
        """Per-replica batches; each input pipeline is told its shard through the InputContext."""
        ctx = tf.distribute.InputContext(
            num_input_pipelines=self.world_size,
            input_pipeline_id=self.rank,
            num_replicas_in_sync=self.num_replicas,
        )
        dataset = dataset_fn(ctx)
        device = prefetch_device(self.prefetch_to_device, tf.config.list_logical_devices("GPU"))
        if device is not None and isinstance(dataset, tf.data.Dataset):
            dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device))
        return dataset

    # -- computation ----------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], args: tuple = ()) -> Any:
        """Run ``fn`` on every local replica (inside a tf.function)."""
        return fn(*args)

    def reduce_sum(self, per_replica: Any) -> Any:
        """Sum a per-replica structure over all replicas of all processes."""
        return per_replica

    def local_results(self, per_replica: Any) -> list[Any]:
        """This process's replicas' values of a per-replica value (one per local device)."""
        return [per_replica]

    def eval_sum(self, per_replica: Any) -> Any:
        """Sum inside an eval step. Horovod sums locally and reduces once per pass in
        `allreduce_host_sum`; tf.distribute syncs every step."""
        return per_replica

    def allreduce_host_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Sum host-side numbers over processes (eval totals after uneven loops)."""
        return dict(values)

    def eval_gather(self, per_replica: Any) -> Any:
        """Inside an eval step: every replica's rows of a per-replica tensor, concatenated."""
        return per_replica

    def process_values(self, value: float) -> list[float]:
        """Every process's ``value``, indexed by rank (a collective: every process calls it)."""
        return [float(value)]

    def start_timeline(self, path: str) -> None:
        """Record the collective library's own timeline into ``path`` (Horovod only)."""
        raise NotImplementedError(f"strategy {self.name!r} has no collective timeline")

    def stop_timeline(self) -> None:
        raise NotImplementedError(f"strategy {self.name!r} has no collective timeline")

    def in_lockstep(self, batches: Any) -> Iterator[Any]:
        """The batches of a one-pass (eval) data set, so that every process runs the same number
        of steps: an eval step may hold a collective (a metric over the global batch), and a
        process that left the loop early would leave the others waiting in it. tf.distribute's
        iterators already agree, handing a replica without data an empty batch."""
        return iter(batches)

    def reduce_gradients(
        self, grads: list[Any], options: GradientOptions | None = None
    ) -> tuple[list[Any], tf.Tensor]:
        """In replica context: dedup/densify/compress, then all-reduce.

        Returns:
            (reduced gradients, bytes this replica handed to the collective).
        """
        return reduce_gradients(
            grads, options or self.gradient_options, self.gradient_backend, self._hvd()
        )

    def _hvd(self) -> Any:
        return None

    def broadcast_variables(self, variables: list[Any]) -> None:
        """Make the initial state identical everywhere (tf.distribute strategies already do)."""

    def barrier(self) -> None:
        """Wait for every process (before reading files another process wrote)."""

    def sync_non_trainable(self, variables: list[Any]) -> None:
        """Make statistics that replicas update locally (batch-norm moving averages) agree."""

    def checkpoint_dir(self, directory: str) -> str | None:
        """Where this process writes checkpoints; None: this process does not write."""
        return directory if self.is_chief else None

    def cleanup_checkpoint_dir(self, directory: str | None) -> None:
        """Remove what a non-chief wrote only because the strategy made it save."""


class LocalStrategy(Strategy):
    """One replica in this process, fed and run directly.

    No tf.distribute wrapper: a OneDeviceStrategy's distributed iterator, ``run`` and ``reduce``
    cost ~8% of a small model's step (benchmarks/bench_overhead.py) and buy nothing with one
    replica. TensorFlow's default placement already puts the work on the first GPU if any.
    """

    name = "local"


class TFDistributeStrategy(Strategy):
    """A tf.distribute strategy: replicas are devices, collectives run inside the step."""

    gradient_backend = "tf_distribute"

    def __init__(self, tf_strategy: tf.distribute.Strategy, options: GradientOptions) -> None:
        super().__init__(options)
        self.tf_strategy = tf_strategy

    @property
    def num_replicas(self) -> int:
        return self.tf_strategy.num_replicas_in_sync

    def scope(self) -> contextlib.AbstractContextManager:
        return self.tf_strategy.scope()

    def distribute_dataset(self, dataset_fn: DatasetFn) -> Any:
        return self.tf_strategy.distribute_datasets_from_function(dataset_fn)

    def run(self, fn: Callable[..., Any], args: tuple = ()) -> Any:
        return self.tf_strategy.run(fn, args=args)

    def reduce_sum(self, per_replica: Any) -> Any:
        return tf.nest.map_structure(
            lambda v: self.tf_strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), per_replica
        )

    def eval_sum(self, per_replica: Any) -> Any:
        return self.reduce_sum(per_replica)

    def eval_gather(self, per_replica: Any) -> Any:
        return self.tf_strategy.gather(per_replica, axis=0)

    def local_results(self, per_replica: Any) -> list[Any]:
        return list(self.tf_strategy.experimental_local_results(per_replica))


class MirroredStrategy(TFDistributeStrategy):
    """All devices of this machine (``num_cpu_devices`` logical CPUs for tests without GPUs)."""

    name = "mirrored"

    def __init__(
        self,
        options: GradientOptions,
        num_cpu_devices: int | None = None,
        cross_device_ops: str = "auto",
    ) -> None:
        devices = [d.name for d in _logical_cpus(num_cpu_devices)] if num_cpu_devices else None
        ops = _mirrored_all_reduce(cross_device_ops)
        super().__init__(
            tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops), options
        )


class MultiWorkerStrategy(TFDistributeStrategy):
    """MultiWorkerMirrored over the workers named by TF_CONFIG (discovered if unset)."""

    name = "multiworker"
    fit_logs_need_rank = True

    def __init__(self, options: GradientOptions, gpus: StrategyConfig | None = None) -> None:
        if "TF_CONFIG" not in os.environ:
            tf_config = discover_tf_config(os.environ)
            if tf_config is None:
                raise ConfigError(
                    "strategy.name",
                    "multiworker needs TF_CONFIG, an MPI launch (mpirun/srun --mpi), Slurm "
                    "variables or horovodrun variables; none were found in the environment",
                )
            os.environ["TF_CONFIG"] = json.dumps(tf_config)
        _place(self.name, node_slot(os.environ), gpus)
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        kinds = tf.distribute.experimental.CommunicationImplementation
        if gpus is not None and gpus.cross_device_ops == "nccl":
            _need_gpus("nccl")
            implementation = kinds.NCCL
        else:
            implementation = kinds.AUTO if tf.config.list_physical_devices("GPU") else kinds.RING
        comm = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        super().__init__(
            tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=resolver, communication_options=comm
            ),
            options,
        )
        self._task_id = int(resolver.task_id or 0)
        self._num_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1

    @property
    def rank(self) -> int:
        return self._task_id

    @property
    def world_size(self) -> int:
        return self._num_workers

    def barrier(self) -> None:
        zero = self.tf_strategy.run(lambda: tf.constant(0.0))
        self.tf_strategy.reduce(tf.distribute.ReduceOp.SUM, zero, axis=None)

    def process_values(self, value: float) -> list[float]:
        # Each replica puts the value in its process's slot; the sum counts it once per local
        # replica, which the division takes back out.
        slots = tf.one_hot(self.rank, self.world_size, on_value=float(value), dtype=tf.float64)
        local = self.num_replicas // self.world_size
        summed = self.tf_strategy.reduce(
            tf.distribute.ReduceOp.SUM, self.tf_strategy.run(lambda: slots), axis=None
        )
        return [float(v) / local for v in summed.numpy()]

    def checkpoint_dir(self, directory: str) -> str | None:
        # Every worker must take part in save() (variables may need a collective read), but only
        # the chief's files are kept: the others write to a private scratch dir and delete it.
        if self.is_chief:
            return directory
        return os.path.join(directory, f".worker_{self.rank}_scratch")

    def cleanup_checkpoint_dir(self, directory: str | None) -> None:
        if directory and not self.is_chief:
            shutil.rmtree(directory, ignore_errors=True)


class HorovodGroup(CollectiveGroup):
    """Every process of a Horovod job, one replica each."""

    def __init__(self, hvd: Any) -> None:
        self.hvd = hvd

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return int(self.hvd.size())  # elastic jobs grow and shrink

    def _gather(self, x: tf.Tensor) -> tf.Tensor:
        return self.hvd.allgather(x)

    def _sum(self, x: tf.Tensor) -> tf.Tensor:
        return self.hvd.allreduce(x, op=self.hvd.Sum)

    def _index(self) -> tf.Tensor:
        return tf.constant(self.hvd.rank(), tf.int32)


class HorovodStrategy(Strategy):
    """One replica per process; Horovod collectives instead of tf.distribute's."""

    name = "horovod"
    logs_are_per_process = True
    gradient_backend = "horovod"

    def __init__(
        self, options: GradientOptions, timeline: bool = False, gpus: StrategyConfig | None = None
    ) -> None:
        import horovod.tensorflow as hvd  # the only place Horovod is imported

        if timeline:
            # Horovod records a timeline started mid-run only in its dynamic mode, chosen
            # before init; a file named here would record the whole run instead.
            given = os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
            if given != "DYNAMIC":
                raise ConfigError(
                    "training.profile.horovod_timeline",
                    f"HOROVOD_TIMELINE={given} already records the whole run; unset it to "
                    "record the profiler window's steps only",
                )
        hvd.init()
        _place(self.name, NodeSlot(hvd.local_rank(), hvd.local_size()), gpus)
        self.hvd = hvd
        set_process_group(HorovodGroup(hvd))
        super().__init__(options)

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    @property
    def world_size(self) -> int:
        return self.hvd.size()

    @property
    def gradient_op(self) -> str:  # type: ignore[override]
        return self.gradient_options.op

    def _hvd(self) -> Any:
        return self.hvd

    def reduce_sum(self, per_replica: Any) -> Any:
        flat = tf.nest.flatten(per_replica)
        summed = self.hvd.grouped_allreduce(
            [tf.cast(v, tf.float64) for v in flat], op=self.hvd.Sum, name="dist_share_reduce_sum"
        )
        return tf.nest.pack_sequence_as(per_replica, summed)

    def allreduce_host_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(values)
        if not keys:
            return {}
        vec = tf.constant([float(values[k]) for k in keys], tf.float64)
        total = self.hvd.allreduce(vec, op=self.hvd.Sum, name="dist_share_host_sum").numpy()
        return {k: float(v) for k, v in zip(keys, total, strict=True)}

    def eval_gather(self, per_replica: Any) -> Any:
        return self.hvd.allgather(per_replica)

    def in_lockstep(self, batches: Any) -> Iterator[Any]:
        # Each step first asks whether any process still has a batch (one scalar allreduce);
        # a process that has none takes part with zero rows.
        empty = tf.nest.map_structure(_empty_batch, batches.element_spec)
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            have = tf.constant(0.0 if batch is None else 1.0)
            if float(self.hvd.allreduce(have, op=self.hvd.Sum, name="dist_share_more")) == 0:
                return
            yield empty if batch is None else batch

    def broadcast_variables(self, variables: list[Any]) -> None:
        self.hvd.broadcast_variables(tf_variables(variables), root_rank=0)

    def barrier(self) -> None:
        self.hvd.allreduce(tf.constant(0.0), name="dist_share_barrier")

    def process_values(self, value: float) -> list[float]:
        gathered = self.hvd.allgather(tf.constant([value], tf.float64), name="dist_share_values")
        return [float(v) for v in gathered.numpy()]

    def start_timeline(self, path: str) -> None:
        """Record Horovod's timeline (its collectives, rank by rank) into ``path`` from now on;
        every process calls it, the coordinator writes the file."""
        self.hvd.start_timeline(path, mark_cycles=False)

    def stop_timeline(self) -> None:
        self.hvd.stop_timeline()

    def sync_non_trainable(self, variables: list[Any]) -> None:
        # A variable every replica updates alike (aggregation ONLY_FIRST_REPLICA, e.g. the
        # logQ frequency estimate) is already identical: averaging could round it.
        floats = [
            v
            for v in tf_variables(variables)
            if v.dtype.is_floating and v.aggregation != tf.VariableAggregation.ONLY_FIRST_REPLICA
        ]
        if floats and self.world_size > 1:
            averaged = self.hvd.grouped_allreduce(
                [tf.convert_to_tensor(v) for v in floats],
                op=self.hvd.Average,
                name="dist_share_sync",
            )
            for v, a in zip(floats, averaged, strict=True):
                v.assign(a)


def _empty_batch(spec: tf.TensorSpec) -> tf.Tensor:
    """A batch of zero rows with the element's structure (inner sizes unknown: 0)."""
    return tf.zeros([0, *(d if d is not None else 0 for d in spec.shape[1:])], spec.dtype)


# -- construction ---------------------------------------------------------------------------
def get_strategy(cfg: StrategyConfig | None = None, horovod_timeline: bool = False) -> Strategy:
    """Build the strategy named by ``strategy.name`` (call before any other TF op runs).

    Args:
        cfg: the ``strategy`` section; None means the default (local).
        horovod_timeline: Horovod may record its timeline for a while (``start_timeline``).

    Raises:
        ConfigError: multiworker without a cluster to join, or logical CPU devices requested
            after TensorFlow initialised its devices.
    """
    if cfg is None:
        cfg = StrategyConfig()
    if cfg.name not in STRATEGIES:
        raise ConfigError(
            "strategy.name", f"got {cfg.name!r}, expected one of {', '.join(STRATEGIES)}"
        )
    options = GradientOptions.from_config(cfg)
    strategy = _build(cfg, options, horovod_timeline)
    strategy.prefetch_to_device = cfg.prefetch_to_device
    return strategy


def _build(cfg: StrategyConfig, options: GradientOptions, horovod_timeline: bool) -> Strategy:
    if cfg.name == "multiworker":
        return MultiWorkerStrategy(options, gpus=cfg)
    if cfg.name == "horovod":
        return HorovodStrategy(options, timeline=horovod_timeline, gpus=cfg)
    _place(cfg.name, NodeSlot(), cfg)  # this process alone takes the machine's GPUs
    if cfg.name == "mirrored":
        return MirroredStrategy(
            options, num_cpu_devices=cfg.num_cpu_devices, cross_device_ops=cfg.cross_device_ops
        )
    return LocalStrategy(options)


def _place(name: str, slot: NodeSlot, cfg: StrategyConfig | None) -> None:
    """This process's GPUs (`devices.place`), before TensorFlow starts its devices."""
    cfg = cfg or StrategyConfig(name=name)
    place(
        tf.config,
        name,
        slot,
        memory_growth=cfg.gpu_memory_growth,
        allow_shared=cfg.allow_shared_gpus,
        num_cpu_devices=cfg.num_cpu_devices,
    )


def _mirrored_all_reduce(choice: str) -> tf.distribute.CrossDeviceOps | None:
    """``strategy.cross_device_ops`` for MirroredStrategy; None lets TensorFlow choose."""
    if choice == "nccl":
        _need_gpus("nccl")
        return tf.distribute.NcclAllReduce()
    if choice == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    if choice == "reduction_to_one_device":
        return tf.distribute.ReductionToOneDevice()
    return None


def _need_gpus(choice: str) -> None:
    if not tf.config.list_logical_devices("GPU"):
        raise ConfigError(
            "strategy.cross_device_ops",
            f"{choice} sums on GPUs and this process has none "
            "(use auto, hierarchical_copy or reduction_to_one_device)",
        )


def _logical_cpus(n: int) -> list[tf.config.LogicalDevice]:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as e:  # devices already initialised: fine only if they already match
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise ConfigError(
                "strategy.num_cpu_devices",
                f"cannot create {n} logical CPU devices after TensorFlow initialised its devices; "
                "build the strategy first thing in the process",
            ) from e
    return tf.config.list_logical_devices("CPU")[:n]
