"""The config schema: one frozen dataclass per YAML section, whose field defaults are the only defaults.

Which keys each section takes, their types, bounds and defaults live here; docs/ARCHITECTURE.md
says how a YAML file becomes a checked `Config`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from dist_share.config.fields import option

FAMILIES = ("siamese", "triplet", "multiview", "two_tower")
SOURCES = ("digits", "two_tower_synthetic", "npz", "random", "tfrecord")
STRATEGIES = ("local", "mirrored", "multiworker", "horovod")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
CROSS_DEVICE_OPS = ("auto", "nccl", "hierarchical_copy", "reduction_to_one_device")
SHARING_MODES = ("shared", "separate", "grouped", "switchable")
SECTIONS = ("model", "data", "optimizer", "training", "strategy", "checkpoint", "logging")
# The keys of ``model`` each family reads; the rest keep their defaults and are not saved.
_COMMON_MODEL_KEYS = ("family", "embedding_dim", "loss")
_TOWER_MODEL_KEYS = (*_COMMON_MODEL_KEYS, "head", "tower")
MODEL_KEYS = {
    "siamese": (*_TOWER_MODEL_KEYS, "head_threshold"),
    "triplet": _TOWER_MODEL_KEYS,
    "multiview": (*_TOWER_MODEL_KEYS, "num_classes"),
    "two_tower": (*_COMMON_MODEL_KEYS, "tables", "query", "candidate"),
}


def default_block() -> dict:
    """The tower block a config gets when it names none."""
    return {
        "type": "conv2d",
        "filters": [16, 32],
        "kernel_size": 3,
        "pool_size": 2,
        "norm": "batch",
        "activation": "relu",
        "dense": [64],
    }


# -- the schema: one frozen dataclass per section ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """``model.tower``: how the streams of a tower family share weights (see towers.SharedTower)."""

    sharing: str = option("shared", choices=SHARING_MODES)
    groups: list | None = None
    use_shared: bool = True
    fold: bool = True
    # Read as a mapping; the family's check_model replaces it with the checked blocks.BlockSpec
    # (every default filled in), so the tower is built without checking the spec again.
    block: dict = option(default_block())


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """One entry of ``model.tables``: an embedding table the two towers may share."""

    vocab_size: int = option(positive=True)
    dim: int | None = option(None, positive=True)  # null: model.embedding_dim


@dataclasses.dataclass(frozen=True)
class SideConfig:
    """``model.query`` / ``model.candidate`` of a two-tower model."""

    features: dict | None = None
    combiner: str = option("mean", choices=("mean", "sum"))
    # Read as a mapping; checked once into a blocks.BlockSpec by the two-tower family.
    block: dict = option({"type": "mlp", "units": [64], "activation": "relu"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``model``: the family and its parts. Which keys a family reads is the family's to say."""

    family: str = option(choices=FAMILIES)
    embedding_dim: int = option(32, positive=True)
    loss: dict | None = None
    head: str | None = None
    # siamese pairs: pair_accuracy's threshold, half the margin or calibrated at each evaluation
    head_threshold: str = option("half_margin", choices=("half_margin", "calibrated"))
    num_classes: int = option(10, positive=True)
    tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    tables: dict[str, TableConfig] | None = None
    query: SideConfig = dataclasses.field(default_factory=SideConfig)
    candidate: SideConfig = dataclasses.field(default_factory=SideConfig)


@dataclasses.dataclass(frozen=True)
class ViewsConfig:
    max_shift: int = option(1, minimum=0, maximum=3)
    noise_std: float = option(0.2, minimum=0.0)
    occlusion: int = option(4, minimum=0, maximum=8)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = option(500, positive=True)
    num_items: int = option(2000, positive=True)
    num_clusters: int = option(20, minimum=2)
    preferred_clusters: int = option(2, positive=True)
    history_length: int = option(10, positive=True)
    zipf_exponent: float = option(1.1, minimum=0.0)
    positive_fraction: float = option(0.5, minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class RandomConfig:
    num_examples: int = option(4096, positive=True)
    image_shape: list = option([8, 8, 1])


@dataclasses.dataclass(frozen=True)
class TFRecordConfig:
    """``data.tfrecord``: sharded TFRecord files written by ``dist-share data convert``.

    ``train`` and ``eval`` are each a directory holding a converted data set (its manifest's
    shards of that split), one shard file, or a glob of shard files (docs/DATA.md).
    """

    train: str | None = None
    eval: str | None = None  # null: the eval split of the ``train`` directory
    sharding: str = option("auto", choices=("auto", "file", "example"))
    cycle_length: int = option(8, positive=True)


# What a row's label is: the data's own label of a tuple (a pair's match, a view set's class);
# the class of a single item, whose pairs or triplets the loss mines in the batch; or, in a
# two-tower batch, the candidate's id, which the in-batch softmax's corrections compare.
LABELS = ("given", "classes", "candidate_ids")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """``data.sampler``: how training rows are drawn into a global batch.

    ``class_balanced`` draws ``classes_per_batch`` classes and ``examples_per_class`` rows of
    each into every global batch (P x K = ``training.batch_size``), so every anchor has
    positives to mine; ``shuffle`` draws rows in a seeded random order.
    """

    type: str = option("shuffle", choices=("shuffle", "class_balanced"))
    classes_per_batch: int = option(8, minimum=2)
    examples_per_class: int = option(4, minimum=2)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``data``: where examples come from. ``family`` is copied from ``model.family`` and
    ``labels`` follows from ``model.loss`` (see LABELS); neither needs setting."""

    source: str | None = option(None, choices=SOURCES)
    family: str | None = option(None, choices=FAMILIES)
    labels: str | None = option(None, choices=LABELS)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    num_views: int = option(3, minimum=1)
    eval_fraction: float = option(0.25, positive=True, maximum=0.9)
    split_seed: int = 0
    train_examples: int = option(16384, positive=True)
    eval_examples: int = option(2048, positive=True)
    shuffle_buffer: int = option(16384, positive=True)
    views: ViewsConfig = dataclasses.field(default_factory=ViewsConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    random: RandomConfig = dataclasses.field(default_factory=RandomConfig)
    train_path: str | None = None
    eval_path: str | None = None
    tfrecord: TFRecordConfig = dataclasses.field(default_factory=TFRecordConfig)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = option("adam", choices=OPTIMIZERS)
    learning_rate: float = option(0.001, positive=True)
    scale_lr_by_world_size: bool = False
    clipnorm: float | None = option(None, positive=True)
    weight_decay: float | None = option(None, minimum=0.0)
    momentum: float = option(0.0, minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """``training.profile``: a TF profiler trace of steps start_step + 1 ... start_step + steps,
    on the chief (docs/MONITORING.md); ``steps: 0`` (the default) profiles nothing."""

    start_step: int = option(0, minimum=0)
    steps: int = option(0, minimum=0)
    # Also Horovod's timeline of the same steps (strategy horovod only).
    horovod_timeline: bool = False


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """``training``: the loop. ``batch_size`` is the GLOBAL batch over all replicas."""

    steps: int = option(600, positive=True)
    batch_size: int = option(64, positive=True)
    grad_accum_steps: int = option(1, positive=True)
    steps_per_loop: int = option(1, positive=True)
    # The compute dtype policy; ``mixed_float16`` adds loss scaling (docs/GPU.md). The older
    # ``mixed_precision: true`` is read as ``mixed_float16`` (resolve.py).
    precision: str = option("float32", choices=PRECISIONS)
    # XLA for each replica's forward and backward pass: ``auto`` compiles where it pays and can
    # work (a GPU, not Horovod, no collective inside the pass); ``true`` insists.
    jit_compile: str = option("auto", choices=("auto", "true", "false"))
    loop: str = option("custom", choices=("custom", "keras_fit"))
    log_every: int = option(50, positive=True)
    eval_every: int = option(200, minimum=0)
    eval_batches: int | None = option(None, positive=True)
    # Also retrieval metrics over the whole eval split at every evaluation (docs/RETRIEVAL.md).
    retrieval_eval: bool = False
    deterministic: bool = False
    seed: int = 0
    # Seconds without a peer's heartbeat before the job is ended (exit 3; watchdog.py). Below
    # Gloo's own 30 s receive timeout, so the message that names the rank comes first.
    stall_timeout: float = option(20.0, minimum=5.0)
    # What a non-finite loss or reduced gradient does (nonfinite.py): end the run, or skip it.
    on_nonfinite: str = option("stop", choices=("stop", "skip"))
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    @property
    def loss_scaled(self) -> bool:
        """float16 gradients underflow without a loss scale; bfloat16 has float32's range."""
        return self.precision == "mixed_float16"


@dataclasses.dataclass(frozen=True)
class HorovodConfig:
    compression: str = option("none", choices=("none", "fp16", "bf16"))
    op: str = option("average", choices=("average", "sum"))
    grouped_allreduce: bool = True
    sparse_as_dense: bool = False
    # Elastic Horovod (elastic.py): workers may leave and join while the job runs (horovodrun
    # --min-np/--max-np/--host-discovery-script); the state is committed every commit_every steps.
    elastic: bool = False
    commit_every: int = option(10, positive=True)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    dedup: bool = True
    dense_threshold: float | None = option(0.5, minimum=0.0, maximum=1.0)
    dense_switch: str = option("measured", choices=("measured", "static"))


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    name: str = option("local", choices=STRATEGIES)
    num_cpu_devices: int | None = option(None, positive=True)
    # Each process takes the GPUs `distribute.devices` gives it; memory grows as needed
    # rather than all of it taken at start, and two processes may share a GPU only if allowed.
    gpu_memory_growth: bool = True
    allow_shared_gpus: bool = False
    # How MirroredStrategy sums across its devices (multi-worker: auto or nccl); auto lets
    # TensorFlow choose (NCCL on GPUs).
    cross_device_ops: str = option("auto", choices=CROSS_DEVICE_OPS)
    # Copy each batch to the process's GPU ahead of the step (local and Horovod; the
    # tf.distribute strategies always do).
    prefetch_to_device: bool = True
    horovod: HorovodConfig = dataclasses.field(default_factory=HorovodConfig)
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(200, minimum=0)
    keep: int = option(3, positive=True)
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    # A rank whose median own step time is more than this fraction above the other ranks'
    # median is named at the end of a run of several processes (docs/MONITORING.md).
    slow_rank_margin: float = option(0.25, minimum=0)


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole resolved config, built by `dist_share.run.resolve` (``load_config``, ``validate``)."""

    model: ModelConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        """Plain data (what `dump` writes and `validate` reads back); the model section holds
        only the keys its family reads."""
        out = _to_dict(self)
        keys = MODEL_KEYS[self.model.family]
        out["model"] = {k: v for k, v in out["model"].items() if k in keys}
        return out


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)
