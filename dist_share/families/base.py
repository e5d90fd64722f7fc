"""What a model family is: its streams, labels, losses, heads, data sources and config checks.

A family is the one place that says what a Siamese, triplet, multi-view or two-tower job is;
config resolution, the inputs of a run and the model builder all ask it (docs/ARCHITECTURE.md).
The families import Keras and the model modules inside the methods that build or check layers,
so that a config's other sections are checked before TensorFlow starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dist_share.config.schema import MODEL_KEYS, DataConfig, ModelConfig
from dist_share.data.checks import check_item_classes
from dist_share.data.digits import digits_with_labels
from dist_share.data.types import Arrays
from dist_share.errors import ConfigError

# The stream of a tower family whose rows are single labelled items (labels: classes).
ITEM = "item"


@dataclasses.dataclass(frozen=True)
class Tower:
    """One tower of a trained model, alone: what `dist-share export --tower`, `embed` and
    retrieval evaluation use.

    Attributes:
        name: the tower's name (`Family.tower_names`).
        model: a Keras model whose inputs are this tower's streams only (a dict by stream name)
            and whose output is the embedding the model compares, sharing the trained weights.
        streams: its input streams.
        similarity: how two embeddings compare (`retrieval.topk.SIMILARITIES`): ``dot``, or
            ``l2`` (a smaller distance is closer).
        reference: the full model's embedding of this tower, from a batch of every stream;
            the export is checked against it.
    """

    name: str
    model: Any
    streams: tuple[str, ...]
    similarity: str
    reference: Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows of a corpus as one tower reads them: its streams, each row's id (ascending), and
    each row's class where the rows have one."""

    features: dict[str, np.ndarray]
    ids: np.ndarray
    classes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """Queries, a corpus, and which corpus ids are relevant to each query (docs/RETRIEVAL.md).

    Relevance is either by class (``queries.classes`` and ``corpus.classes``) or by list:
    query q's relevant ids are ``relevant_ids[relevant_offsets[q]:relevant_offsets[q + 1]]``.
    ``exclude_self``: the queries are corpus rows (``queries.ids``), each left out of its own
    results and of its relevant items.
    """

    queries: Rows
    corpus: Rows
    exclude_self: bool = False
    relevant_offsets: np.ndarray | None = None
    relevant_ids: np.ndarray | None = None


class Family:
    """What one model family is. Subclasses fill in the class attributes and the hooks."""

    name: str = ""
    losses: tuple[str, ...] = ()  # loss types that fit; the first is the default
    heads: tuple[str, ...] = ()  # head names that fit; the first is the default
    sources: tuple[str, ...] = ()  # data sources that fit; the first is the default
    label_dtype: str = "float32"
    fixed_streams: tuple[str, ...] = ()  # empty: the data config decides (multiview)

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The keys of ``model`` this family reads (the config schema says which)."""
        return MODEL_KEYS[self.name]

    # -- streams and labels --------------------------------------------------------------
    def labels_for(self, model: ModelConfig) -> str:
        """What a row's label is under this model's loss (`config.schema.LABELS`)."""
        return "given"

    def model_streams(self, model: ModelConfig) -> tuple[str, ...]:
        """The streams the model takes (empty: the data decides, as multiview's views)."""
        return self.fixed_streams

    def streams(self, data: DataConfig) -> list[str]:
        """Stream names in model input order."""
        return list(self.fixed_streams)

    def stream_dtype(self, stream: str) -> str:
        """The dtype a stream is fed as (``.npz`` arrays are cast to it)."""
        return "float32"

    def dtype_of_labels(self, data: DataConfig) -> str:
        """The dtype labels are fed as."""
        return self.label_dtype

    def label_stream(self, data: DataConfig) -> str | None:
        """The stream whose values the loss receives as labels (None: the data's labels)."""
        return None

    def check_labels(self, labels: np.ndarray, where: str, data: DataConfig) -> None:
        """Raise ConfigError when labels cannot be this family's (``where`` names the file/key)."""

    def random_labels(self, rng: np.random.Generator, n: int, data: DataConfig) -> np.ndarray:
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
        from dist_share.model.losses import get_loss

        kind = model.loss.get("type") if isinstance(model.loss, Mapping) else None
        if kind not in self.losses:
            raise ConfigError(
                "model.loss.type",
                f"got {kind!r}, expected one of {', '.join(self.losses)} for family {self.name}",
            )
        loss = get_loss(model.loss, "model.loss")
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

    def calibrates(self, model: ModelConfig) -> bool:
        """The model's output is a pair distance whose threshold evaluation calibrates."""
        return False

    # -- towers ----------------------------------------------------------------------------
    def tower_names(self, model: ModelConfig, streams: list[str]) -> list[str]:
        """The towers a trained model of this family can be cut into (``streams``: its inputs)."""
        raise NotImplementedError

    def retrieval_towers(self, model: ModelConfig, streams: list[str]) -> tuple[str, str]:
        """(the tower that embeds queries, the tower that embeds the corpus)."""
        raise NotImplementedError

    def build_tower(
        self, keras_model: Any, model: ModelConfig, streams: list[str], name: str
    ) -> Tower:
        """Tower ``name`` (one of `tower_names`) of a built model whose inputs are ``streams``
        in the model's order, sharing its weights."""
        raise NotImplementedError

    def corpus_rows(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, tower: Tower
    ) -> Rows:
        """The rows of ``split`` (its ``arrays``) that ``tower`` embeds as a corpus."""
        raise NotImplementedError

    def retrieval_task(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, towers: tuple
    ) -> RetrievalTask:
        """What retrieval over ``split`` asks, for ``towers`` = (query tower, corpus tower)."""
        raise NotImplementedError


class TowerFamily(Family):
    """Families whose streams all go through one `SharedTower` (siamese, triplet, multiview).

    A family whose loss mines its pairs or triplets in the batch (``model.loss.mining``) reads
    single labelled items instead of tuples: one stream, `ITEM`, and each row's class as its
    label (``data.labels: classes``); the model's output is then the item's embedding.
    """

    sources = ("digits", "npz", "random", "tfrecord")

    def labels_for(self, model: ModelConfig) -> str:
        mining = model.loss.get("mining", "none") if isinstance(model.loss, Mapping) else "none"
        return "classes" if mining != "none" else "given"

    def model_streams(self, model: ModelConfig) -> tuple[str, ...]:
        return (ITEM,) if self.labels_for(model) == "classes" else self.fixed_streams

    def streams(self, data: DataConfig) -> list[str]:
        return [ITEM] if data.labels == "classes" else super().streams(data)

    def dtype_of_labels(self, data: DataConfig) -> str:
        return "int32" if data.labels == "classes" else self.label_dtype

    def check_labels(self, labels: np.ndarray, where: str, data: DataConfig) -> None:
        if data.labels == "classes":
            check_item_classes(labels, where)

    def random_labels(self, rng: np.random.Generator, n: int, data: DataConfig) -> np.ndarray:
        if data.labels == "classes":
            return rng.integers(0, 10, n).astype(np.int32)
        return super().random_labels(rng, n, data)

    def labelled_examples(self, data: DataConfig, split: str, n: int, salt: int) -> Arrays:
        """Single labelled digits: every image of the split at most once, in a seeded order."""
        images, labels, rng = digits_with_labels(data, split, salt)
        take = rng.permutation(len(labels))[:n]
        return {ITEM: images[take]}, labels[take].astype(np.int32)

    def build_item_output(self, model: ModelConfig, inputs: dict[str, Any]) -> tuple:
        """(the item's embedding, the in-batch recall@1 metric) for ``labels: classes``; a
        cosine head makes the embedding unit length (Euclidean distance then ranks as cosine)."""
        import keras

        from dist_share.model.metrics import InBatchRecallAt1

        (embedding,) = self.build_tower_outputs(model, inputs)
        if model.head == "cosine":
            embedding = keras.layers.UnitNormalization(name="unit_norm")(embedding)
        return embedding, {"in_batch_recall_at_1": InBatchRecallAt1()}

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        """Also checks the tower's block once and keeps the checked `blocks.BlockSpec` in
        ``model.tower.block``, so building the tower does not check it again."""
        from dist_share.model.blocks.spec import validate_block_spec
        from dist_share.model.towers import validate_groups

        model = super().check_model(model, num_views)
        spec = validate_block_spec(model.tower.block, "model.tower.block")
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
                    validate_groups(tower.groups, count, "model.tower.groups")
                except ConfigError as e:
                    names = list(self.fixed_streams) or [f"view{i}" for i in range(count)]
                    raise ConfigError(e.path, f"{e.message} (the streams are {names})") from None
        elif tower.groups is not None:
            raise ConfigError(
                "model.tower.groups",
                f"is only used with sharing: grouped (sharing is {tower.sharing!r}); set it to null",
            )
        return model

    def tower_names(self, model: ModelConfig, streams: list[str]) -> list[str]:
        """One tower per stream: the weight set that stream goes through (for shared weights,
        every name is the same tower under its stream's name)."""
        return list(streams)

    def retrieval_towers(self, model: ModelConfig, streams: list[str]) -> tuple[str, str]:
        # Queries take the first stream's weights, the corpus the second's: what the loss
        # compares (left with right, anchor with positive); one stream: itself.
        return streams[0], streams[min(1, len(streams) - 1)]

    def build_tower(
        self, keras_model: Any, model: ModelConfig, streams: list[str], name: str
    ) -> Tower:
        import keras

        layer = keras_model.get_layer("tower")
        index = streams.index(name)
        source = keras_model.get_layer(name).output
        x = keras.Input(shape=source.shape[1:], dtype=source.dtype, name=name)
        y = layer.apply_stream(x, index, training=False)
        cosine = model.head == "cosine"
        if cosine:
            y = keras.layers.UnitNormalization(name="unit_norm")(y)
        tower_model = keras.Model({name: x}, y, name=f"{name}_tower")

        def reference(features: Mapping[str, Any]) -> Any:
            out = layer([features[s] for s in streams], training=False)[index]
            return keras.ops.normalize(out, axis=-1) if cosine else out

        return Tower(name, tower_model, (name,), "dot" if cosine else "l2", reference)

    def corpus_rows(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, tower: Tower
    ) -> Rows:
        """Single labelled items: the split's items; digits: every image of the split once,
        with its class; other pairs or triplets: the tower's stream of every row, no class."""
        (stream,) = tower.streams
        if data.labels == "classes":
            feats, labels = arrays
            images, classes = feats[ITEM], labels
        elif data.source == "digits":
            images, classes, _ = digits_with_labels(data, split, salt=0)
        else:
            images, classes = arrays[0][stream], None
        return Rows({stream: images}, np.arange(len(images), dtype=np.int64), classes)

    def retrieval_task(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, towers: tuple
    ) -> RetrievalTask:
        """The split's labelled items are the gallery and each of them a query: relevant are
        the other items of its class."""
        query_tower, corpus_tower = towers
        corpus = self.corpus_rows(data, model, split, arrays, corpus_tower)
        if corpus.classes is None:
            raise ConfigError(
                "data.source",
                f"retrieval over {self.name} rows needs classes: {data.source} pairs or "
                "triplets have none (use digits, or items with class labels: a mining loss)",
            )
        (q_stream,) = query_tower.streams
        (c_stream,) = corpus_tower.streams
        queries = Rows({q_stream: corpus.features[c_stream]}, corpus.ids, corpus.classes)
        return RetrievalTask(queries, corpus, exclude_self=True)

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
