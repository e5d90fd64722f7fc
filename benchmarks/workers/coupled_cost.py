"""Coupled-cost worker: the step time of an exact batch-coupled option against its per-replica one.

argv: OUT_DIR --strategy horovod|multiworker --pairs negatives,batchnorm,mobilenet
      [--probe] [common options]

Per pair, one process (per rank) builds two dist_share Trainers from the same config, one with
the exact option (global negatives / synchronised batch norm / mining over the global batch /
the in-batch softmax's corrections) and one with its per-replica or uncorrected counterpart, and drives their compiled steps (``CustomLoop.train_step``, one step per call,
the loop's own host-side work included) in interleaved blocks: exact, per-replica, exact, ...
The first `warmup` blocks of each (tracing) are dropped. The collective ops in each compiled
step's graph are counted, and the batch-norm layers of the model. ``--probe`` then times one
dependent collective: chains of k `cross_replica` ``all_sum`` (and ``gather_rows``) calls in
one tf.function, each on the previous one's result, at two chain lengths; the difference of
their times over the difference of k is the time of one, without the call's own cost.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.workers.wlib import common_args, model_and_data, setup_threads, write_result

REPO = Path(__file__).resolve().parents[2]
# The block key that switches batch norm's synchronisation off (model/blocks/spec.py).
NORM_SYNC_KEY = "model.tower.block.norm_sync"
TWO_TOWER_SOFTMAX = ["model.loss.type=in_batch_softmax", "data.synthetic.positive_fraction=1.0"]
HITS, LOGQ = "model.loss.remove_accidental_hits=true", "model.loss.logq_correction=true"
# 8 digits x 128 images per global batch: a step of a few hundred ms on this machine.
LARGE_MINED = ["training.batch_size=1024", "data.sampler.examples_per_class=128"]
WIDE_TOWERS = ["model.query.block.units=[512,512]", "model.candidate.block.units=[512,512]"]
# name: (config, overrides of both sides, exact side's, per-replica side's). A side of None
# builds the model and then switches every batch norm's synchronisation off in place: a Keras
# application's converted layers have no config key.
PAIRS: dict[str, tuple[str, list[str], list[str], list[str] | None]] = {
    "negatives": (
        "two_tower_synthetic.yaml",
        TWO_TOWER_SOFTMAX,
        ["model.loss.negatives=global"],
        ["model.loss.negatives=local"],
    ),
    "batchnorm": (
        "siamese_digits.yaml",
        [],
        [f"{NORM_SYNC_KEY}=true"],
        [f"{NORM_SYNC_KEY}=false"],
    ),
    "mobilenet": ("siamese_digits_mobilenet.yaml", [], [], None),
    # Mined triplets over the global batch vs each replica mining its own rows (the loss run
    # under cross_replica.local_only: the metric still gathers on both sides).
    "batch_hard": ("triplet_digits_mined.yaml", [], [], None),
    "semi_hard": ("triplet_digits_mined.yaml", ["model.loss.mining=semi_hard"], [], None),
    "batch_hard_large": ("triplet_digits_mined.yaml", LARGE_MINED, [], None),
    # The in-batch softmax's corrections vs the plain (global) in-batch softmax.
    "hits": ("two_tower_synthetic.yaml", TWO_TOWER_SOFTMAX, [HITS], []),
    "logq": ("two_tower_synthetic.yaml", TWO_TOWER_SOFTMAX, [LOGQ], []),
    "corrections": ("two_tower_synthetic.yaml", TWO_TOWER_SOFTMAX, [HITS, LOGQ], []),
    # The config's towers at a batch where the loss's [rows, candidates] matrices are most of
    # the step (the worst case for the corrections), and wider towers at a smaller batch.
    "corrections_large": (
        "two_tower_synthetic.yaml",
        [*TWO_TOWER_SOFTMAX, "training.batch_size=8192"],
        [HITS, LOGQ],
        [],
    ),
    "corrections_wide": (
        "two_tower_synthetic.yaml",
        [*TWO_TOWER_SOFTMAX, "training.batch_size=4096", *WIDE_TOWERS],
        [HITS, LOGQ],
        [],
    ),
}
# The pairs whose per-replica side (None above) mines each replica's own rows.
LOCAL_LOSS = {"batch_hard", "semi_hard", "batch_hard_large"}
# Op types that exchange data between replicas (Horovod's, then tf.distribute's); ops that
# only set groups up or ask for the rank or size are not counted.
HOROVOD_EXCHANGES = ("Allreduce", "Allgather", "Broadcast", "Alltoall", "Reducescatter")
TF_COLLECTIVES = ("CollectiveReduce", "CollectiveGather", "CollectiveBcast", "CollectiveAllToAll")


def is_collective(op: str) -> bool:
    if op.startswith("Horovod"):
        return any(word in op for word in HOROVOD_EXCHANGES)
    return op.startswith(TF_COLLECTIVES)


def batch_norm_layers(model: Any) -> list[Any]:
    """The layers whose training forward takes batch statistics through `stream_moments`."""
    from dist_share.model.blocks.norm import StreamBatchNormalization
    from dist_share.model.folding import FoldedBatchNormalization

    kinds = (StreamBatchNormalization, FoldedBatchNormalization)
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, kinds)
    ]


def count_collectives(concrete: Any) -> dict[str, int]:
    """Collective ops in a traced step by op type: its graph and every function in its library."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for fn in graph_def.library.function:
        nodes.extend(fn.node_def)
    return dict(Counter(n.op for n in nodes if is_collective(n.op)))


class ReplicaLoss:
    """A batch-coupled loss computed over each replica's own rows (the per-replica side)."""

    def __init__(self, loss: Any) -> None:
        self.loss = loss
        self.couples_rows = loss.couples_rows

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        from dist_share.model.cross_replica import local_only

        with local_only():
            return self.loss(y_true, y_pred)


class Side:
    """One Trainer, its input iterator and its timed blocks of steps."""

    def __init__(self, cfg: Any, strategy: Any, sync_off: bool, local_loss: bool = False) -> None:
        from dist_share.data.pipeline import train_input
        from dist_share.train.trainer import Trainer

        build_spec, dataset_fn = model_and_data(cfg, cfg.training.batch_size)
        self.trainer = Trainer(build_spec, strategy, cfg, None)
        self.trainer.state.restore()  # no run directory: makes every rank's weights rank 0's
        model = self.trainer.state.model
        if local_loss:
            self.trainer.state.spec.loss = ReplicaLoss(self.trainer.state.spec.loss)
        self.norms = batch_norm_layers(model)
        if sync_off:
            for layer in self.norms:
                layer.sync = False
        names = self.trainer.state.spec.stream_names
        self.iterator = iter(strategy.distribute_dataset(train_input(dataset_fn, 0, names)))
        self.loop = self.trainer.loop
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def block(self, steps: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.loop.train_step(self.iterator, 1)  # reads the logs back: the step has ended
        self.wall.append((time.perf_counter() - t0) / steps)
        self.cpu.append((time.process_time() - c0) / steps)

    def close(self) -> dict[str, int]:
        """Free the input; returns the collective ops in the compiled step, by type."""
        collectives = count_collectives(self.loop._train_fn.get_concrete_function())
        self.loop.release_input()
        self.trainer.close()
        return collectives


def run_pair(name: str, strategy: Any, args: Any) -> dict[str, Any]:
    from dist_share.distribute.gradients import GradientOptions
    from dist_share.run.resolve import load_config

    config, common, exact, relaxed = PAIRS[name]
    blocks = args.warmup + args.repeats
    overrides = [
        f"strategy.name={args.strategy}",
        f"training.steps={blocks * args.block + 1}",
        "training.eval_every=0",
        "checkpoint.every=0",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *common,
        *args.set,
    ]
    sides = {}
    for side, extra in (("exact", exact), ("per_replica", relaxed)):
        cfg = load_config(REPO / "configs" / config, overrides + (extra or []))
        # One strategy serves every pair; the gradient options are each config's own.
        strategy.gradient_options = GradientOptions.from_config(cfg.strategy)
        switch = extra is None
        sides[side] = Side(
            cfg,
            strategy,
            sync_off=switch and name not in LOCAL_LOSS,
            local_loss=switch and name in LOCAL_LOSS,
        )
    for _ in range(blocks):
        for side in sides.values():
            side.block(args.block)
    w = args.warmup
    out: dict[str, Any] = {"pair": name, "config": config, "global_batch": cfg.training.batch_size}
    for key, side in sides.items():
        out[key] = {
            "step_s": side.wall[w:],
            "cpu_s_per_step": side.cpu[w:],
            "median_step_s": statistics.median(side.wall[w:]),
            "batch_norm_layers": len(side.norms),
            "synchronised_batch_norms": sum(bool(n.sync) for n in side.norms),
        }
        by_type = side.close()
        out[key]["collective_ops"] = sum(by_type.values())
        out[key]["collective_ops_by_type"] = by_type
    return out


def probe(strategy: Any, chains: tuple[int, int], repeats: int, warmup: int) -> dict[str, Any]:
    """Seconds of one dependent `cross_replica` collective (see the module docstring)."""
    import tensorflow as tf

    from dist_share.model.cross_replica import current_group

    def chain_fn(kind: str, shape: list[int], k: int) -> Any:
        def replica() -> tf.Tensor:
            # Made on the replica's device (an eager tensor from outside is not, under
            # MultiWorkerMirrored), and random: Grappler would fold a chain that starts
            # from a constant into one constant, collectives included.
            group, y = current_group(), tf.random.uniform(shape)
            for _ in range(k):
                if kind == "all_sum":
                    y = group.all_sum(y) * 0.5
                else:
                    y = group.gather_rows(y)[0][: shape[0]] * 0.5
            return y

        @tf.function
        def fn() -> Any:
            return strategy.run(replica)

        return fn

    # all_sum: a batch norm's packed moments (4 x 2 streams x 32 channels); gather_rows: a
    # replica's candidate embeddings (64 rows x 32).
    shapes = {"all_sum": [4, 2, 32], "gather_rows": [64, 32]}
    out: dict[str, Any] = {}
    for kind, shape in shapes.items():
        medians = {}
        for k in chains:
            fn, times = chain_fn(kind, shape, k), []
            for r in range(warmup + repeats):
                t0 = time.perf_counter()
                strategy.local_results(fn())[0].numpy()
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
            medians[k] = statistics.median(times)
        short, long = chains
        out[kind] = {
            "chain_s": {str(k): v for k, v in medians.items()},
            "seconds": (medians[long] - medians[short]) / (long - short),
            "bytes": 4 * math.prod(shape),
        }
    return out


def main() -> None:
    p = common_args(__doc__)
    p.add_argument("--strategy", choices=("horovod", "multiworker"), required=True)
    p.add_argument("--pairs", default="negatives,batchnorm", help=f"some of {sorted(PAIRS)}")
    p.add_argument("--probe", action="store_true", help="time one dependent collective")
    p.add_argument("--chains", default="4,24", help="the probe's two chain lengths")
    p.add_argument("--probe-repeats", type=int, default=15)
    args = p.parse_args()
    pairs = [s for s in args.pairs.split(",") if s]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        p.error(f"unknown pairs {unknown}; expected some of {sorted(PAIRS)}")
    t_start = time.perf_counter()
    threads = setup_threads(args.intra, args.inter)

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name=args.strategy))
    results = [run_pair(name, strategy, args) for name in pairs]
    short, long = (int(k) for k in args.chains.split(","))
    latency = probe(strategy, (short, long), args.probe_repeats, 2) if args.probe else None
    write_result(
        args.out_dir,
        f"coupled_cost_rank{strategy.rank}",
        {
            "strategy": args.strategy,
            "rank": strategy.rank,
            "processes": strategy.world_size,
            "replicas": strategy.num_replicas,
            "threads": threads,
            "block_steps": args.block,
            "warmup_blocks": args.warmup,
            "pairs": results,
            "probe": latency,
            "wall_s": time.perf_counter() - t_start,
        },
    )


if __name__ == "__main__":
    main()
