"""Embedding parts into a directory: what a killed job leaves is cleaned up by the next run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from dist_share.config.schema import StrategyConfig
from dist_share.distribute.strategies import get_strategy
from dist_share.retrieval.corpus import array_parts
from dist_share.retrieval.embed import check_output, embed_parts, read_embeddings

PLAN = {"run": "r", "tower": "t", "step": 1, "corpus": "c", "part_size": 4}


def _embed(out: Path) -> tuple[int, int]:
    features = {"x": np.arange(20, dtype=np.float32).reshape(10, 2)}
    parts = array_parts(features, np.arange(10), None, part_size=4)
    result = embed_parts(
        get_strategy(StrategyConfig()), lambda f: tf.identity(f["x"]) * 2.0, parts, out, PLAN,
        {"tower": "t", "dimension": 2}, batch_size=3,
    )  # fmt: skip
    return result.written, result.skipped


def test_a_killed_jobs_temporaries_are_removed_and_finished_parts_kept(tmp_path: Path) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    # What a SIGKILL in the middle of the first write (the plan) leaves: the directory is new.
    (out / ".plan.json.abc123.tmp").write_text("{")
    assert check_output(out, PLAN, overwrite=False) == "new"
    assert _embed(out) == (3, 0)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # ... and in the middle of a part: the rerun keeps the finished parts, removes the rest.
    (out / "part-00001-of-00003.npz").unlink()
    (out / "manifest.json").unlink()
    (out / ".part-00001-of-00003.npz.x9y8z7.tmp").write_bytes(b"\0" * 10)
    kept = (out / "part-00000-of-00003.npz").stat().st_ino
    assert check_output(out, PLAN, overwrite=False) == "resume"
    assert _embed(out) == (1, 2)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "part-00000-of-00003.npz").stat().st_ino == kept
    ids, vectors, _ = read_embeddings(out)
    np.testing.assert_array_equal(ids, np.arange(10))
    np.testing.assert_array_equal(vectors, np.arange(20, dtype=np.float32).reshape(10, 2) * 2)
