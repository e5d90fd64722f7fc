"""Where replicas live: one small interface over local, MirroredStrategy, MultiWorkerMirrored and Horovod.

The trainer is written once against `Strategy`. tf.distribute strategies run a replica function
per device and all-reduce inside the step; Horovod runs one replica per process and all-reduces
with its own collectives. What differs between them (how data is sharded, how gradients and
metrics are reduced, who is chief, how the initial state is made identical) is in here and in
`gradients.py`, nowhere else. Horovod is imported only when the ``horovod`` strategy is built.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from dist_share.errors import ConfigError
from dist_share.gradients import GradientOptions, reduce_gradients
from dist_share.launching import free_port, tf_config_dict

STRATEGY_NAMES = ("local", "mirrored", "multiworker", "horovod")
DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


class Strategy:
    """Base: a tf.distribute strategy plus the facts the trainer needs (rank, chief, replicas)."""

    name: str = "base"

    def __init__(self, tf_strategy: tf.distribute.Strategy, options: GradientOptions) -> None:
        self.tf_strategy = tf_strategy
        self.gradient_options = options

    # -- identity -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return 1

    @property
    def num_replicas(self) -> int:
        """Number of replicas across all processes (devices x processes)."""
        return self.tf_strategy.num_replicas_in_sync

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def gradient_op(self) -> str:
        """'sum' if the loss is divided by the global batch, 'average' if by the replica batch."""
        return "sum"

    def scope(self) -> contextlib.AbstractContextManager:
        return self.tf_strategy.scope()

    # -- data -----------------------------------------------------------------------------
    def distribute_dataset(self, dataset_fn: DatasetFn) -> Any:
        """Per-replica batches; each input pipeline is told its shard through the InputContext."""
        return self.tf_strategy.distribute_datasets_from_function(dataset_fn)

    # -- computation ----------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], args: tuple = ()) -> Any:
        return self.tf_strategy.run(fn, args=args)

    def reduce_sum(self, per_replica: Any) -> Any:
        """Sum a per-replica structure over all replicas of all processes (cross-replica context)."""
        return tf.nest.map_structure(
            lambda v: self.tf_strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), per_replica
        )

    def eval_sum(self, per_replica: Any) -> Any:
        """Sum inside an eval step. Horovod ranks may run different numbers of eval steps, so
        they sum locally and reduce once in `allreduce_host_sum`; tf.distribute syncs per step."""
        return self.reduce_sum(per_replica)

    def local_results(self, per_replica: Any) -> list[Any]:
        return list(self.tf_strategy.experimental_local_results(per_replica))

    def allreduce_host_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """Sum host-side numbers over processes (eval totals after uneven loops)."""
        return dict(values)

    def reduce_gradients(
        self,
        grads: list[Any],
        variables: list[tf.Variable],
        options: GradientOptions | None = None,
    ) -> tuple[list[Any], tf.Tensor]:
        """In replica context: dedup/densify/compress, then all-reduce. Returns (grads, bytes sent)."""
        opts = options or self.gradient_options
        del variables  # the shapes come from the gradients
        return reduce_gradients(grads, opts, backend="tf_distribute")

    def broadcast_variables(self, variables: list[Any]) -> None:
        """Make the initial state identical everywhere (tf.distribute strategies already do)."""

    def barrier(self) -> None:
        """Wait for every process (before reading files another process wrote)."""

    def sync_non_trainable(self, variables: list[Any]) -> None:
        """Make statistics that replicas update locally (batch-norm moving averages) agree.

        tf.distribute strategies aggregate those updates already; Horovod ranks drift apart.
        """

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

    def __init__(self, options: GradientOptions) -> None:
        super().__init__(tf.distribute.get_strategy(), options)

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def distribute_dataset(self, dataset_fn: DatasetFn) -> Any:
        return dataset_fn(tf.distribute.InputContext())

    def run(self, fn: Callable[..., Any], args: tuple = ()) -> Any:
        return fn(*args)

    def reduce_sum(self, per_replica: Any) -> Any:
        return per_replica

    def local_results(self, per_replica: Any) -> list[Any]:
        return [per_replica]


class MirroredStrategy(Strategy):
    name = "mirrored"

    def __init__(self, options: GradientOptions, num_cpu_devices: int | None = None) -> None:
        devices = None
        if num_cpu_devices:
            devices = [d.name for d in _logical_cpus(num_cpu_devices)]
        super().__init__(tf.distribute.MirroredStrategy(devices=devices), options)


class MultiWorkerStrategy(Strategy):
    name = "multiworker"

    def __init__(self, options: GradientOptions) -> None:
        if "TF_CONFIG" not in os.environ:
            tf_config = discover_tf_config(os.environ)
            if tf_config is None:
                raise ConfigError(
                    "strategy.name",
                    "multiworker needs TF_CONFIG, an MPI launch (mpirun/srun --mpi), Slurm "
                    "variables or horovodrun variables; none were found in the environment",
                )
            os.environ["TF_CONFIG"] = json.dumps(tf_config)
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING
            if not tf.config.list_physical_devices("GPU")
            else tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        super().__init__(
            tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=resolver, communication_options=comm
            ),
            options,
        )
        self._task_id = resolver.task_id or 0
        self._num_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1

    @property
    def rank(self) -> int:
        return int(self._task_id)

    @property
    def world_size(self) -> int:
        return self._num_workers

    def checkpoint_dir(self, directory: str) -> str | None:
        # Every worker must take part in save() (variables may need a collective read), but only
        # the chief's files are kept: the others write to a private scratch dir and delete it.
        if self.is_chief:
            return directory
        return os.path.join(directory, f".worker_{self.rank}_scratch")

    def cleanup_checkpoint_dir(self, directory: str | None) -> None:
        if directory and not self.is_chief:
            shutil.rmtree(directory, ignore_errors=True)


class HorovodStrategy(Strategy):
    """One replica per process; Horovod collectives instead of tf.distribute's."""

    name = "horovod"

    def __init__(self, options: GradientOptions) -> None:
        import horovod.tensorflow as hvd  # the only place Horovod is imported

        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            # One GPU per local rank: processes on a host must not share a device.
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        self.hvd = hvd
        super().__init__(tf.distribute.get_strategy(), options)

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    @property
    def world_size(self) -> int:
        return self.hvd.size()

    @property
    def num_replicas(self) -> int:
        return self.hvd.size()

    @property
    def gradient_op(self) -> str:
        return self.gradient_options.op

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def distribute_dataset(self, dataset_fn: DatasetFn) -> Any:
        size, rank = self.hvd.size(), self.hvd.rank()
        ctx = tf.distribute.InputContext(
            num_input_pipelines=size, input_pipeline_id=rank, num_replicas_in_sync=size
        )
        return dataset_fn(ctx)

    def run(self, fn: Callable[..., Any], args: tuple = ()) -> Any:
        return fn(*args)

    def reduce_sum(self, per_replica: Any) -> Any:
        flat = tf.nest.flatten(per_replica)
        summed = self.hvd.grouped_allreduce(
            [tf.cast(v, tf.float64) for v in flat], op=self.hvd.Sum, name="dist_share_reduce_sum"
        )
        return tf.nest.pack_sequence_as(per_replica, summed)

    def eval_sum(self, per_replica: Any) -> Any:
        return per_replica

    def local_results(self, per_replica: Any) -> list[Any]:
        return [per_replica]

    def allreduce_host_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = sorted(values)
        if not keys:
            return {}
        vec = tf.constant([float(values[k]) for k in keys], tf.float64)
        total = self.hvd.allreduce(vec, op=self.hvd.Sum, name="dist_share_host_sum").numpy()
        return {k: float(v) for k, v in zip(keys, total, strict=True)}

    def reduce_gradients(
        self,
        grads: list[Any],
        variables: list[tf.Variable],
        options: GradientOptions | None = None,
    ) -> tuple[list[Any], tf.Tensor]:
        opts = options or self.gradient_options
        del variables
        return reduce_gradients(grads, opts, backend="horovod", hvd=self.hvd)

    def broadcast_variables(self, variables: list[Any]) -> None:
        # Keras 3 variables wrap a tf.Variable; Horovod needs the tf.Variable (it calls .ref()).
        tf_vars = [
            getattr(v, "value", v) if not isinstance(v, tf.Variable) else v for v in variables
        ]
        self.hvd.broadcast_variables(tf_vars, root_rank=0)

    def barrier(self) -> None:
        self.hvd.allreduce(tf.constant(0.0), name="dist_share_barrier")

    def sync_non_trainable(self, variables: list[Any]) -> None:
        tf_vars = [
            getattr(v, "value", v) if not isinstance(v, tf.Variable) else v for v in variables
        ]
        floats = [v for v in tf_vars if v.dtype.is_floating]
        if floats and self.world_size > 1:
            averaged = self.hvd.grouped_allreduce(
                [tf.convert_to_tensor(v) for v in floats],
                op=self.hvd.Average,
                name="dist_share_sync",
            )
            for v, a in zip(floats, averaged, strict=True):
                v.assign(a)


# -- construction ---------------------------------------------------------------------------
def get_strategy(strategy_cfg: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy named by ``strategy.name`` (call before any other TF op runs)."""
    cfg = dict(strategy_cfg or {})
    name = cfg.get("name", "local")
    if name not in STRATEGY_NAMES:
        raise ConfigError(
            "strategy.name", f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}"
        )
    options = GradientOptions.from_config(cfg)
    if name == "local":
        return LocalStrategy(options)
    if name == "mirrored":
        n = cfg.get("num_cpu_devices")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ConfigError("strategy.num_cpu_devices", f"must be a positive integer, got {n!r}")
        return MirroredStrategy(options, num_cpu_devices=n)
    if name == "multiworker":
        return MultiWorkerStrategy(options)
    return HorovodStrategy(options)


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


# -- TF_CONFIG discovery for multiworker ----------------------------------------------------
def discover_tf_config(env: Mapping[str, str]) -> dict | None:
    """TF_CONFIG from an MPI, Slurm or horovodrun launch, in that order; None if none applies."""
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _tf_config_from_mpi()
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return tf_config_from_slurm(env)
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        return _tf_config_from_horovodrun(env)
    return None


def _tf_config_from_mpi() -> dict:
    """Every rank picks a free port and the ranks allgather host:port over MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    workers = comm.allgather(f"{socket.gethostname()}:{free_port()}")
    return tf_config_dict(workers, comm.Get_rank())


def expand_nodelist(nodelist: str, use_scontrol: bool | None = None) -> list[str]:
    """Expand a Slurm nodelist (``node[01-03,07],gpu5``); uses scontrol when it is installed."""
    if use_scontrol is None:
        use_scontrol = shutil.which("scontrol") is not None
    if use_scontrol:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def tf_config_from_slurm(env: Mapping[str, str], base_port: int | None = None) -> dict:
    """Tasks are placed block-wise (Slurm's default): task i runs on node i // tasks_per_node."""
    rank, ntasks = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    if not nodes:
        raise ConfigError("strategy.name", "multiworker under Slurm: SLURM_JOB_NODELIST is empty")
    per_node = -(-ntasks // len(nodes))
    port = base_port or int(env.get("DIST_SHARE_BASE_PORT", "23456"))
    workers = [f"{nodes[i // per_node]}:{port + i % per_node}" for i in range(ntasks)]
    return tf_config_dict(workers, rank)


def _tf_config_from_horovodrun(env: Mapping[str, str]) -> dict:
    """horovodrun --gloo runs an HTTP key-value store (its rendezvous); exchange host:port there."""
    rank, size = int(env["HOROVOD_RANK"]), int(env["HOROVOD_SIZE"])
    base = f"http://{env['HOROVOD_GLOO_RENDEZVOUS_ADDR']}:{env['HOROVOD_GLOO_RENDEZVOUS_PORT']}"
    host = env.get("HOROVOD_HOSTNAME", socket.gethostname())
    host = "127.0.0.1" if host in ("localhost", "127.0.0.1") else host
    mine = f"{host}:{free_port()}".encode()
    req = urllib.request.Request(f"{base}/dist_share_tf_config/{rank}", data=mine, method="PUT")
    urllib.request.urlopen(req, timeout=30).close()
    workers = [_kv_get(f"{base}/dist_share_tf_config/{i}") for i in range(size)]
    return tf_config_dict(workers, rank)


def _kv_get(url: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
