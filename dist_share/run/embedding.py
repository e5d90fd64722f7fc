"""``dist-share embed``: a run's tower over a corpus, each process embedding its parts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dist_share.data.records.manifest import MANIFEST_NAME
from dist_share.data.records.source import RecordSource
from dist_share.errors import DataError
from dist_share.families.base import Rows, Tower
from dist_share.retrieval.corpus import Part, array_parts, record_parts
from dist_share.retrieval.embed import embed_parts
from dist_share.run.export import tower_description
from dist_share.run.inputs import load_arrays, record_source
from dist_share.run.restored import RestoredRun
from dist_share.run.writes import write_or_explain


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """How ``dist-share embed`` cuts and runs the corpus."""

    split: str = "eval"
    part_size: int = 65536
    batch_size: int = 1024
    overwrite: bool = False


def check_rows(
    features: Mapping[str, Any], tower: Tower, specs: Mapping[str, Any], where: str
) -> None:
    """Every stream of the tower is there, with the per-row shape the tower was built for."""
    for stream in tower.streams:
        want = list(specs[stream].shape.as_list())
        if stream not in features:
            raise DataError(
                f"{where}: no stream {stream!r}; the {tower.name} tower takes "
                f"{list(tower.streams)} (per row {stream} {want})"
            )
        got = list(np.shape(features[stream])[1:])
        if got != want:
            raise DataError(
                f"{where}: stream {stream!r} has shape {got} per row, the {tower.name} tower "
                f"expects {want}"
            )


def _npz_rows(path: Path, tower: Tower, specs: Mapping[str, Any]) -> Rows:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"corpus {path}: not a readable .npz file ({e})") from None
    check_rows(arrays, tower, specs, f"corpus {path}")
    n = len(arrays[tower.streams[0]])
    ids = np.asarray(arrays.get("ids", np.arange(n)), np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n:
        raise DataError(f"corpus {path}: 'ids' must hold {n} distinct integers, one per row")
    classes = arrays.get("classes", arrays.get("labels"))
    order = np.argsort(ids, kind="stable")
    features = {s: arrays[s][order].astype(specs[s].dtype.name) for s in tower.streams}
    return Rows(features, ids[order], None if classes is None else np.asarray(classes)[order])


def corpus_parts(
    restored: RestoredRun, tower: Tower, corpus: str | None, options: EmbedOptions
) -> tuple[list[Part], str]:
    """The corpus cut into parts, and how the plan names it: the run's own split (default), an
    ``.npz`` file, or a directory of TFRecord shards from ``dist-share data convert``."""
    data, specs = restored.cfg.data, restored.run.inputs.specs
    classes = data.labels == "classes"
    if corpus is None and data.source == "tfrecord":
        source = record_source(data, options.split)
        return record_parts(source, tower.streams, classes), f"{data.source} {options.split}"
    if corpus is None:
        arrays = load_arrays(data, options.split)
        rows = restored.family.corpus_rows(data, restored.cfg.model, options.split, arrays, tower)
        name = f"{data.source} {options.split}"
    elif Path(corpus).is_dir() and (Path(corpus) / MANIFEST_NAME).is_file():
        source = RecordSource.open(corpus, split=options.split)
        shapes = {k: np.zeros([0, *v.shape]) for k, v in source.manifest.streams.items()}
        check_rows(shapes, tower, specs, f"corpus {corpus}")
        return record_parts(source, tower.streams, classes), str(Path(corpus).resolve())
    elif Path(corpus).suffix == ".npz" and Path(corpus).is_file():
        rows = _npz_rows(Path(corpus), tower, specs)
        name = str(Path(corpus).resolve())
    else:
        raise DataError(
            f"corpus {corpus}: not an .npz file or a directory of shards with a {MANIFEST_NAME}"
        )
    return array_parts(rows.features, rows.ids, rows.classes, options.part_size), name


def embed(
    run_dir: Path,
    out: Path,
    tower_name: str | None = None,
    corpus: str | None = None,
    options: EmbedOptions = EmbedOptions(),
    overrides: Sequence[str] = (),
) -> str:
    """Embed a corpus with one tower of the run into ``out``; returns what was done (the
    chief's summary)."""
    restored = RestoredRun(run_dir, "embed", [*overrides, "training.precision=float32"])
    streams = restored.streams
    name = tower_name or restored.family.retrieval_towers(restored.cfg.model, streams)[1]
    tower = restored.tower(name)
    parts, corpus_name = corpus_parts(restored, tower, corpus, options)
    plan = {
        "run": str(Path(run_dir).resolve()),
        "tower": tower.name,
        "step": restored.step,
        "corpus": corpus_name,
        "split": options.split,
        "part_size": options.part_size,
        "parts": len(parts),
    }
    model = tower.model
    result = None

    def write() -> None:
        nonlocal result
        result = embed_parts(
            restored.strategy,
            lambda features: model(features, training=False),
            parts,
            out,
            plan,
            tower_description(restored, tower),
            options.batch_size,
            options.overwrite,
        )

    kept = "the parts already written are kept: rerun the same command to finish"
    write_or_explain(f"the {name} embeddings of step {restored.step}", out, kept, write)
    restored.close()
    rank = restored.strategy.rank
    done = (
        f"process {rank}: embedded {result.written} parts ({result.rows} rows), "
        f"{result.skipped} already done"
    )
    if result.manifest is None:
        return done
    m = result.manifest
    return (
        f"{done}\nwrote {m['count']} {m['dimension']}-dimensional {tower.name} embeddings of "
        f"step {restored.step} in {len(parts)} parts to {out} ({out / 'manifest.json'})"
    )
