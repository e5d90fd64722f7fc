"""A corpus embedded into ``(id, vector)`` shards: each process writes its parts, atomically, resumable.

The output directory holds ``plan.json`` (what is being embedded: written first), one
``part-NNNNN-of-NNNNN.npz`` per part (``ids`` int64, ``vectors`` float32, ``classes`` int64
with -1 where unknown), and ``manifest.json`` (written last, once every part exists). A part's
file appears whole or not at all, so a rerun of the same plan skips the parts already there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from dist_share import files
from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError, DataError
from dist_share.retrieval.corpus import Part

PLAN = "plan.json"
MANIFEST = "manifest.json"


def part_name(index: int, total: int) -> str:
    return f"part-{index:05d}-of-{total:05d}.npz"


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    """What this process did: parts written, parts found finished, and rows written."""

    written: int
    skipped: int
    rows: int
    manifest: dict | None  # the chief's manifest


def check_output(out: Path, plan: dict, overwrite: bool) -> str:
    """``new``, ``resume`` (the same plan, some parts done) or ``overwrite``; without touching
    ``out``. Every process calls it, so that all refuse together.

    Raises:
        ConfigError: ``out`` holds another plan's embeddings (without ``overwrite``), or other
            files.
    """
    if not out.exists() or (out.is_dir() and not _own_files(out)):
        return "new"
    if not out.is_dir():
        raise ConfigError("--out", f"{out} is a file, not a directory")
    if not (out / PLAN).is_file():
        raise ConfigError(
            "--out", f"{out} holds other files and no {PLAN}: choose an empty or new directory"
        )
    found = json.loads((out / PLAN).read_text())
    if found == plan:
        return "resume"
    if overwrite:
        return "overwrite"
    theirs = f"run {found.get('run')}, tower {found.get('tower')}, step {found.get('step')}"
    differ = ", ".join(
        f"{key} {found.get(key)!r} there, {value!r} here"
        for key, value in plan.items()
        if found.get(key) != value
    )
    raise ConfigError(
        "--out",
        f"{out} holds other embeddings ({theirs}; {differ}); pass --overwrite to replace them",
    )


def _stale_temporaries(out: Path) -> list[Path]:
    """What a killed job left of the files it was writing (`files.atomic_write`'s temporaries):
    a SIGKILL leaves no chance to remove them, so the next run does."""
    names = ("part-*.npz", MANIFEST, PLAN)
    return [path for name in names for path in out.glob(f".{name}.*.tmp")]


def _own_files(out: Path) -> list[Path]:
    """The files of ``out`` other than a killed job's temporaries."""
    stale = set(_stale_temporaries(out))
    return [path for path in out.iterdir() if path not in stale]


def _clear(out: Path) -> None:
    """Remove a previous plan's files (only the ones this module writes)."""
    for path in [*out.glob("part-*.npz"), out / MANIFEST, out / PLAN]:
        path.unlink(missing_ok=True)


def _write_part(path: Path, ids: np.ndarray, vectors: np.ndarray, classes: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, ids=ids, vectors=vectors, classes=classes)

    files.atomic_write(path, write)


def embed_parts(
    strategy: Strategy,
    encode: Callable[[Any], tf.Tensor],
    parts: Sequence[Part],
    out: Path,
    plan: dict,
    description: dict,
    batch_size: int,
    overwrite: bool = False,
) -> EmbedResult:
    """Embed ``parts`` into ``out``, process r taking parts r, r + n, ... of n processes.

    Args:
        encode: a batch of features to ``[B, d]`` vectors (a tower, `families.base.Tower`).
        plan: what identifies this embedding (run, tower, step, corpus, part size): a rerun
            with an equal plan resumes; another plan is refused unless ``overwrite``.
        description: more for the manifest (the tower's inputs, dimension, similarity).
        batch_size: rows per forward pass; a part's vectors do not depend on which process
            embeds it, since its batches are always the same rows.

    Raises:
        ConfigError: see `check_output`. OSError: a part could not be written; the parts
            already written stay, and a rerun finishes the others.
    """
    mode = check_output(out, plan, overwrite)
    strategy.barrier()  # every process has looked before the chief writes
    if strategy.is_chief:
        if mode == "overwrite":
            _clear(out)
        if out.is_dir():
            for path in _stale_temporaries(out):
                path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        if mode != "resume":
            files.atomic_write_text(out / PLAN, json.dumps(plan, indent=2, sort_keys=True) + "\n")
    strategy.barrier()
    forward = tf.function(encode, reduce_retracing=True)
    written = skipped = rows = 0
    total = len(parts)
    for part in parts[strategy.rank :: strategy.world_size]:
        path = out / part_name(part.index, total)
        if path.exists():
            skipped += 1
            continue
        ids, vectors, classes = [], [], []
        for features, batch_ids, batch_classes in part.batches(batch_size):
            vectors.append(np.asarray(forward(features), np.float32))
            ids.append(batch_ids)
            classes.append(batch_classes)
        got = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if len(got) != part.count:
            raise DataError(
                f"part {part.index} of the corpus has {len(got)} rows, expected {part.count}"
            )
        _write_part(path, got, np.concatenate(vectors), np.concatenate(classes))
        written += 1
        rows += part.count
    strategy.barrier()
    manifest = None
    if strategy.is_chief:
        missing = [
            part_name(p.index, total)
            for p in parts
            if not (out / part_name(p.index, total)).exists()
        ]
        if missing:
            raise RuntimeError(f"{out}: parts missing after every process finished: {missing[:5]}")
        manifest = {
            **description,
            "count": int(sum(p.count for p in parts)),
            "dtype": "float32",
            "parts": [
                {"file": part_name(p.index, total), "count": p.count, "first_id": p.first_id}
                for p in parts
            ],
            "plan": plan,
        }
        files.atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return EmbedResult(written, skipped, rows, manifest)


def read_embeddings(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, classes) of a finished embedding directory, in id order."""
    manifest = json.loads((out / MANIFEST).read_text())
    loaded = [np.load(out / p["file"]) for p in manifest["parts"]]
    ids = np.concatenate([z["ids"] for z in loaded])
    order = np.argsort(ids, kind="stable")
    vectors = np.concatenate([z["vectors"] for z in loaded])[order]
    classes = np.concatenate([z["classes"] for z in loaded])[order]
    return ids[order], vectors, classes
