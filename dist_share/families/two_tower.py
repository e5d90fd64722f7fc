"""The two-tower family: query and candidate towers over embedding tables they may share."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dist_share.config.schema import DataConfig, ModelConfig
from dist_share.data.checks import check_binary_labels
from dist_share.data.synthetic import synthetic_interactions
from dist_share.data.types import Arrays
from dist_share.errors import ConfigError, hint
from dist_share.families.base import Family, RetrievalTask, Rows, Tower


class TwoTowerFamily(Family):
    """A query tower and a candidate tower over embedding tables that they may share."""

    name = "two_tower"
    losses = ("binary", "in_batch_softmax")
    sources = ("two_tower_synthetic", "npz", "random", "tfrecord")
    fixed_streams = ("query_user", "query_history", "candidate_item")
    SIDES = ("query", "candidate")
    # The stream whose values identify a candidate (its row of the candidate's table).
    CANDIDATE_ID = "candidate_item"

    def labels_for(self, model: ModelConfig) -> str:
        loss = model.loss if isinstance(model.loss, dict) else {}
        corrected = loss.get("remove_accidental_hits") or loss.get("logq_correction")
        return "candidate_ids" if corrected else "given"

    def stream_dtype(self, stream: str) -> str:
        return "int32"

    def label_stream(self, data: DataConfig) -> str | None:
        return self.CANDIDATE_ID if data.labels == "candidate_ids" else None

    def check_labels(self, labels: np.ndarray, where: str, data: DataConfig) -> None:
        check_binary_labels(labels, where, self.name)

    def model_defaults(self) -> dict:
        return {
            **super().model_defaults(),
            "tables": {"users": {"vocab_size": 500}, "items": {"vocab_size": 2000}},
            "query": {"features": {"query_user": "users", "query_history": "items"}},
            "candidate": {"features": {"candidate_item": "items"}},
        }

    def check_model(self, model: ModelConfig, num_views: int | None) -> ModelConfig:
        """Also checks each side's block once and keeps the checked `BlockSpec`."""
        from dist_share.model.blocks.spec import validate_block_spec

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
            block = validate_block_spec(scfg.block, f"{path}.block")
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
        if self.labels_for(model) == "candidate_ids" and fed[self.CANDIDATE_ID] != "candidate":
            key = next(
                k for k in ("remove_accidental_hits", "logq_correction") if model.loss.get(k)
            )
            raise ConfigError(
                f"model.loss.{key}",
                f"needs candidate ids, the values of stream {self.CANDIDATE_ID}, but it feeds "
                f"model.{fed[self.CANDIDATE_ID]}, not model.candidate",
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

        return synthetic_interactions(data, split, n)

    def build_output(self, model: ModelConfig, inputs: dict[str, Any], loss: Any) -> tuple:

        import keras

        from dist_share.model.blocks.build import build_block
        from dist_share.model.blocks.embedding import CombineFields
        from dist_share.model.heads import StackPair
        from dist_share.model.metrics import BinaryAccuracy, InBatchTop1
        from dist_share.model.sampling import CandidateFrequency

        tables = {
            name: keras.layers.Embedding(
                t.vocab_size, t.dim or model.embedding_dim, name=f"table_{name}"
            )
            for name, t in model.tables.items()
        }
        inputs = dict(inputs)
        if getattr(loss, "logq_correction", False):
            # In the graph so that its estimate is a weight of the model: saved, restored and
            # updated by every training forward, in the custom loop and in Keras fit alike.
            table = model.tables[self.table_of(model, self.CANDIDATE_ID)]
            frequency = CandidateFrequency(
                table.vocab_size, loss.logq_alpha, name="candidate_frequency"
            )
            inputs[self.CANDIDATE_ID] = frequency(inputs[self.CANDIDATE_ID])
            loss.frequency = frequency
        embeddings = []
        for side in self.SIDES:
            scfg = getattr(model, side)
            looked_up = [tables[t](inputs[s]) for s, t in scfg.features.items()]
            pooled = CombineFields(scfg.combiner, name=f"{side}_combine")(looked_up)
            embeddings.append(
                build_block(scfg.block, model.embedding_dim, name=f"{side}_tower")(pooled)
            )
        metrics = {"binary_accuracy": BinaryAccuracy(), "in_batch_top1": InBatchTop1()}
        if self.labels_for(model) == "candidate_ids":
            del metrics["binary_accuracy"]  # the labels are ids, not 0/1
        return StackPair(name="pair")(embeddings), metrics

    def tower_names(self, model: ModelConfig, streams: list[str]) -> list[str]:
        return list(self.SIDES)

    def retrieval_towers(self, model: ModelConfig, streams: list[str]) -> tuple[str, str]:
        return self.SIDES[0], self.SIDES[1]

    def build_tower(
        self, keras_model: Any, model: ModelConfig, streams: list[str], name: str
    ) -> Tower:
        import keras

        own = tuple(getattr(model, name).features)
        inputs = {s: keras_model.get_layer(s).output for s in own}
        output = keras_model.get_layer(f"{name}_tower").output
        side = self.SIDES.index(name)

        def reference(features: Any) -> Any:
            return keras_model(features, training=False)[:, side]  # StackPair: [B, 2, d]

        tower_model = keras.Model(inputs, output, name=f"{name}_tower_model")
        return Tower(name, tower_model, own, "dot", reference)

    def corpus_rows(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, tower: Tower
    ) -> Rows:
        """The candidate tower: the catalogue, every id of its table once. The query tower:
        each distinct user of the split, with the features of its first row."""
        feats, _ = arrays
        if tower.name == "candidate":
            if tower.streams != (self.CANDIDATE_ID,):
                raise ConfigError(
                    "model.candidate.features",
                    f"the catalogue is the ids of stream {self.CANDIDATE_ID}; a candidate "
                    f"tower fed by {list(tower.streams)} has no catalogue to embed (give a "
                    "corpus file)",
                )
            table = model.tables[self.table_of(model, self.CANDIDATE_ID)]
            ids = np.arange(table.vocab_size, dtype=np.int64)
            return Rows({self.CANDIDATE_ID: ids.astype(np.int32)}, ids)
        users, first = np.unique(feats["query_user"], return_index=True)
        rows = {s: feats[s][first] for s in tower.streams}
        return Rows(rows, users.astype(np.int64))

    def retrieval_task(
        self, data: DataConfig, model: ModelConfig, split: str, arrays: Arrays, towers: tuple
    ) -> RetrievalTask:
        """Every item of the catalogue is a candidate; the queries are the users with a
        relevant row in the split, and their relevant items the candidates of those rows."""
        query_tower, corpus_tower = towers
        feats, labels = arrays
        corpus = self.corpus_rows(data, model, split, arrays, corpus_tower)
        positive = np.asarray(labels) > 0.5
        users = feats["query_user"][positive]
        items = feats[self.CANDIDATE_ID][positive].astype(np.int64)
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        keep = np.ones(len(users), bool)
        keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])  # each pair once
        users, items = users[keep], items[keep]
        query_users, starts = np.unique(users, return_index=True)
        offsets = np.append(starts, len(users)).astype(np.int64)
        all_queries = self.corpus_rows(data, model, split, arrays, query_tower)
        take = np.searchsorted(all_queries.ids, query_users)
        queries = Rows({s: v[take] for s, v in all_queries.features.items()}, query_users)
        return RetrievalTask(queries, corpus, relevant_offsets=offsets, relevant_ids=items)
