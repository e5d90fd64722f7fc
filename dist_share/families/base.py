"""Model families: the one place that says what a Siamese, triplet, multi-view or two-tower job is.

A family knows its streams, which losses and heads fit it (the first is the default), its
metrics, the label type, which data sources can feed it and how its examples are made from
them, and how the tower outputs become the model's output. Config validation, the data
pipelines and the model builder all ask the family instead of keeping tables of their own.

Importing this module loads neither TensorFlow nor Keras (``dist-share --help`` stays fast);
the methods that build layers or check layer specs import them when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_share.data import checks as datacheck
from dist_share.errors import ConfigError, hint

if TYPE_CHECKING:
    from dist_share.config.schema import DataConfig, ModelConfig

NAMES = ("siamese", "triplet", "multiview", "two_tower")
SOURCES = ("digits", "two_tower_synthetic", "npz", "random", "tfrecord")
COMMON_MODEL_KEYS = ("family", "embedding_dim", "loss")
Arrays = tuple[dict[str, np.ndarray], np.ndarray]


class Family:
    """What one model family is. Subclasses fill in the class attributes and the hooks."""

    name: str = ""
    losses: tuple[str, ...] = ()  # loss types that fit; the first is the default
    heads: tuple[str, ...] = ()  # head names that fit; the first is the default
    sources: tuple[str, ...] = ()  # data sources that fit; the first is the default
    model_keys: tuple[str, ...] = COMMON_MODEL_KEYS
    label_dtype: str = "float32"
    fixed_streams: tuple[str, ...] = ()  # empty: the data config decides (multiview)

    # -- streams and labels --------------------------------------------------------------
    def streams(self, data: DataConfig) -> list[str]:
        """Stream names in model input order."""
        return list(self.fixed_streams)

    def stream_dtype(self, stream: str) -> str:
        """The dtype a stream is fed as (``.npz`` arrays are cast to it)."""
        return "float32"

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        """Raise ConfigError when labels cannot be this family's (``where`` names the file/key)."""

    def random_labels(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, 2, n).astype(self.label_dtype)

    # -- config --------------------------------------------------------------------------
    def model_defaults(self) -> dict:
        """Family-dependent defaults of the ``model`` section (the rest are the dataclass's)."""
        out: dict[str, Any] = {"loss": {"type": self.losses[0]}}
        if self.heads:
            out["head"] = self.heads[0]
        return out

    def data_defaults(self) -> dict:
        return {"source": self.sources[0]}

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        """Checks across keys of ``model`` (each key alone was checked by its dataclass);
        returns it with the loss's options filled in."""
        import dataclasses

        from dist_share.model import losses

        kind = model.loss.get("type") if isinstance(model.loss, Mapping) else None
        if kind not in self.losses:
            raise ConfigError(
                "model.loss.type",
                f"got {kind!r}, expected one of {', '.join(self.losses)} for family {self.name}",
            )
        loss = losses.get_loss(model.loss, "model.loss")
        if self.heads and model.head not in self.heads:
            raise ConfigError(
                "model.head",
                f"got {model.head!r}, expected one of {', '.join(self.heads)} for family {self.name}",
            )
        return dataclasses.replace(model, loss={"type": kind, **loss.get_config()})

    def check_data(self, data: DataConfig, model: ModelConfig) -> None:
        """Checks across the ``data`` and ``model`` sections."""
        if data.source not in self.sources:
            raise ConfigError(
                "data.source",
                f"got {data.source!r}, expected one of {', '.join(self.sources)} for family {self.name}",
            )
        if data.source == "npz" and not data.train_path:
            raise ConfigError(
                "data.train_path",
                "is required for source: npz (a .npz file with one array per stream and 'labels')",
            )
        if data.source == "tfrecord" and not data.tfrecord.train:
            raise ConfigError(
                "data.tfrecord.train",
                "is required for source: tfrecord (a directory written by `dist-share data "
                "convert`, or a glob of its shard files)",
            )
        shape = data.random.image_shape
        if not (
            shape and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ConfigError(
                "data.random.image_shape",
                f"got {shape!r}, expected a list of positive integers, e.g. [8, 8, 1]",
            )

    # -- data and model --------------------------------------------------------------------
    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        """``n`` examples of the family's built-in source (digits or synthetic) for ``split``."""
        raise NotImplementedError

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        """(output tensor, {metric name: per-example metric}) from the model's Keras inputs."""
        raise NotImplementedError


class TowerFamily(Family):
    """Families whose streams all go through one `SharedTower` (siamese, triplet, multiview)."""

    sources = ("digits", "npz", "random", "tfrecord")
    model_keys = (*COMMON_MODEL_KEYS, "head", "tower")

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        """Also checks the tower's block once and keeps the checked `blocks.BlockSpec` in
        ``model.tower.block``, so building the tower does not check it again."""
        import dataclasses

        from dist_share.model import blocks, towers

        model = super().check_model(model, num_views)
        spec = blocks.validate_block_spec(model.tower.block, "model.tower.block")
        tower = dataclasses.replace(model.tower, block=spec)
        model = dataclasses.replace(model, tower=tower)
        count = len(self.fixed_streams) or num_views
        if tower.sharing == "grouped":
            if tower.groups is None:
                raise ConfigError(
                    "model.tower.groups",
                    "is required for sharing: grouped (a partition of stream indices)",
                )
            if count:
                try:
                    towers.validate_groups(tower.groups, count, "model.tower.groups")
                except ConfigError as e:
                    names = list(self.fixed_streams) or [f"view{i}" for i in range(count)]
                    raise ConfigError(e.path, f"{e.message} (the streams are {names})") from None
        elif tower.groups is not None:
            raise ConfigError(
                "model.tower.groups",
                f"is only used with sharing: grouped (sharing is {tower.sharing!r}); set it to null",
            )
        return model

    def build_tower_outputs(self, model: ModelConfig, inputs: dict[str, Any]) -> list:
        from dist_share.model.towers import SharedTower

        t = model.tower
        tower = SharedTower(
            t.block,
            num_streams=len(inputs),
            sharing=t.sharing,
            groups=t.groups,
            fold=t.fold,
            use_shared=t.use_shared,
            output_dim=model.embedding_dim,
            name="tower",
        )
        return tower(list(inputs.values()))


class SiameseFamily(TowerFamily):
    name = "siamese"
    losses = ("contrastive",)
    heads = ("l2", "cosine")
    fixed_streams = ("left", "right")

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        from dist_share.data import pipeline as data_lib

        images, by_class, rng = data_lib.digits_for(data, split, salt=1)
        same = rng.permutation(np.arange(n) < n // 2)  # balanced: exactly half the pairs match
        ca = rng.integers(0, 10, n)
        cb = np.where(same, ca, data_lib.other_class(rng, ca))
        left = data_lib.same_class(rng, by_class, ca)
        right = data_lib.same_class(rng, by_class, cb)
        return {"left": images[left], "right": images[right]}, same.astype(np.float32)

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        datacheck.check_binary_labels(labels, where, self.name)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        from dist_share.model import heads, losses

        outs = self.build_tower_outputs(model, inputs)
        layer = (
            heads.L2Distance(name="distance")
            if model.head == "l2"
            else heads.CosineSimilarity(as_distance=True, name="distance")
        )
        threshold = getattr(loss, "margin", 1.0) / 2
        return layer(outs), {"pair_accuracy": losses.PairAccuracy(threshold=threshold)}


class TripletFamily(TowerFamily):
    name = "triplet"
    losses = ("triplet",)
    heads = ("l2",)
    fixed_streams = ("anchor", "positive", "negative")

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        from dist_share.data import pipeline as data_lib

        images, by_class, rng = data_lib.digits_for(data, split, salt=2)
        ca = rng.integers(0, 10, n)
        anchor = data_lib.same_class(rng, by_class, ca)
        positive = data_lib.same_class(rng, by_class, ca)
        negative = data_lib.same_class(rng, by_class, data_lib.other_class(rng, ca))
        feats = {
            "anchor": images[anchor],
            "positive": images[positive],
            "negative": images[negative],
        }
        return feats, np.zeros(n, np.float32)

    def random_labels(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.zeros(n, np.float32)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        from dist_share.model import heads, losses

        outs = self.build_tower_outputs(model, inputs)
        return heads.TripletDistances(name="distances")(outs), {
            "triplet_accuracy": losses.TripletAccuracy()
        }


class MultiviewFamily(TowerFamily):
    name = "multiview"
    losses = ("sparse_categorical_crossentropy",)
    heads = ("concat", "mean", "sum")
    model_keys = (*TowerFamily.model_keys, "num_classes")
    label_dtype = "int32"

    def streams(self, data: DataConfig) -> list[str]:
        return [f"view{i}" for i in range(data.num_views)]

    def random_labels(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, 10, n).astype(np.int32)

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        datacheck.check_class_labels(labels, where, self.name)

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        from dist_share.data import pipeline as data_lib

        images, labels, rng = data_lib.digits_with_labels(data, split, salt=3)
        idx = rng.integers(0, len(labels), n)
        v = data.views
        feats = {
            f"view{i}": data_lib.corrupt(rng, images[idx], v.max_shift, v.noise_std, v.occlusion)
            for i in range(data.num_views)
        }
        return feats, labels[idx]

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        import keras

        from dist_share.model import heads, losses

        outs = self.build_tower_outputs(model, inputs)
        combined = heads.Combine(model.head, name="combine")(outs)
        logits = keras.layers.Dense(model.num_classes, dtype="float32", name="logits")(combined)
        return logits, {"accuracy": losses.ClassAccuracy()}


class TwoTowerFamily(Family):
    """A query tower and a candidate tower over embedding tables that they may share."""

    name = "two_tower"
    losses = ("binary", "in_batch_softmax")
    sources = ("two_tower_synthetic", "npz", "random", "tfrecord")
    model_keys = (*COMMON_MODEL_KEYS, "tables", "query", "candidate")
    fixed_streams = ("query_user", "query_history", "candidate_item")
    SIDES = ("query", "candidate")

    def stream_dtype(self, stream: str) -> str:
        return "int32"

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        datacheck.check_binary_labels(labels, where, self.name)

    def model_defaults(self) -> dict:
        return {
            **super().model_defaults(),
            "tables": {"users": {"vocab_size": 500}, "items": {"vocab_size": 2000}},
            "query": {"features": {"query_user": "users", "query_history": "items"}},
            "candidate": {"features": {"candidate_item": "items"}},
        }

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        """Also checks each side's block once and keeps the checked `blocks.BlockSpec`."""
        import dataclasses

        from dist_share.model import blocks

        model = super().check_model(model, num_views)
        tables = model.tables
        if not tables:
            raise ConfigError(
                "model.tables", "is required for family two_tower, e.g. {users: {vocab_size: 500}}"
            )
        fed: dict[str, str] = {}
        checked: dict[str, Any] = {}
        streams = list(self.fixed_streams)
        for side in self.SIDES:
            scfg = getattr(model, side)
            path = f"model.{side}"
            if not scfg.features:
                raise ConfigError(
                    f"{path}.features", "is required: a mapping {stream_name: table_name}"
                )
            block = blocks.validate_block_spec(scfg.block, f"{path}.block")
            if block["type"] != "mlp":
                raise ConfigError(f"{path}.block.type", "a two_tower tower block must be an mlp")
            checked[side] = dataclasses.replace(scfg, block=block)
            dims = set()
            for stream, table in scfg.features.items():
                where = f"{path}.features.{stream}"
                if stream not in streams:
                    raise ConfigError(
                        where, "is not a two_tower stream" + hint(stream, streams, "streams")
                    )
                if table not in tables:
                    raise ConfigError(
                        where, f"unknown table {table!r}; expected one of {', '.join(tables)}"
                    )
                if stream in fed:
                    raise ConfigError(where, f"already feeds model.{fed[stream]}")
                fed[stream] = side
                dims.add(tables[table].dim or model.embedding_dim)
            if len(dims) > 1:
                raise ConfigError(
                    f"{path}.features",
                    f"tables of one tower must have one dim to be combined, got {sorted(dims)}",
                )
        missing = [s for s in streams if s not in fed]
        if missing:
            raise ConfigError(
                "model.query.features", f"streams {missing} of the data are not fed to either tower"
            )
        return dataclasses.replace(model, **checked)

    def table_of(self, model: ModelConfig, stream: str) -> str:
        for side in self.SIDES:
            features = getattr(model, side).features
            if stream in features:
                return features[stream]
        raise KeyError(stream)

    def check_data(self, data: DataConfig, model: ModelConfig) -> None:
        super().check_data(data, model)
        syn = data.synthetic
        if data.source in ("two_tower_synthetic", "random"):
            if syn.preferred_clusters >= syn.num_clusters:
                raise ConfigError(
                    "data.synthetic.preferred_clusters",
                    f"is {syn.preferred_clusters}, expected fewer than "
                    f"data.synthetic.num_clusters ({syn.num_clusters})",
                )
            for stream, count_key in (
                ("query_user", "num_users"),
                ("candidate_item", "num_items"),
                ("query_history", "num_items"),
            ):
                table = self.table_of(model, stream)
                vocab = model.tables[table].vocab_size
                if vocab < getattr(syn, count_key):
                    raise ConfigError(
                        f"model.tables.{table}.vocab_size",
                        f"is {vocab} but data.synthetic.{count_key} is "
                        f"{getattr(syn, count_key)} (stream {stream})",
                    )

    def examples(self, data: DataConfig, split: str, n: int) -> Arrays:
        from dist_share.data import pipeline as data_lib

        return data_lib.synthetic_interactions(data, split, n)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:
        import keras

        from dist_share.model import heads, losses
        from dist_share.model.blocks import CombineFields, build_block

        tables = {
            name: keras.layers.Embedding(
                t.vocab_size, t.dim or model.embedding_dim, name=f"table_{name}"
            )
            for name, t in model.tables.items()
        }
        embeddings = []
        for side in self.SIDES:
            scfg = getattr(model, side)
            looked_up = [tables[t](inputs[s]) for s, t in scfg.features.items()]
            pooled = CombineFields(scfg.combiner, name=f"{side}_combine")(looked_up)
            embeddings.append(
                build_block(scfg.block, model.embedding_dim, name=f"{side}_tower")(pooled)
            )
        metrics = {
            "binary_accuracy": losses.BinaryAccuracy(),
            "in_batch_top1": losses.InBatchTop1(),
        }
        return heads.StackPair(name="pair")(embeddings), metrics


REGISTRY: dict[str, Family] = {
    f.name: f for f in (SiameseFamily(), TripletFamily(), MultiviewFamily(), TwoTowerFamily())
}
assert tuple(REGISTRY) == NAMES


def get(name: Any, path: str = "model.family") -> Family:
    """The family called ``name``; a ConfigError naming ``path`` otherwise."""
    if name not in REGISTRY:
        extra = hint(name, NAMES) if isinstance(name, str) else ""
        extra = extra if "did you mean" in extra else ""
        raise ConfigError(path, f"got {name!r}, expected one of {', '.join(NAMES)}{extra}")
    return REGISTRY[name]
