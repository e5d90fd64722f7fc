"""Using trained towers through the command line: `export --tower`, `embed` (one process,
horovodrun x2, multi-worker x2, killed and rerun) and `evaluate --retrieval` (one process,
Mirrored x2, horovodrun x2), and their bad inputs and full disks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_share.retrieval.embed import read_embeddings
from tests.helpers import background
from tests.helpers.paths import CONFIGS, EXE, ROOT, WORKERS
from tests.helpers.processes import (
    kill_when,
    local_horovodrun_command,
    run_job,
    run_local_multiworker,
    worker_env,
)
from tests.helpers.runs import metrics
from tests.integration.conftest import mounted_tmpfs
from tests.integration.test_cli import SHORT, dist_share

pytestmark = pytest.mark.timeout(600)

# (config, extra settings, towers exported): every family, and the sharing modes whose towers
# are different weight sets.
RUNS = {
    "siamese": (
        "siamese_digits",
        ["--set", "model.tower.sharing=separate", "--set", "model.head=cosine",
         "--set", "model.head_threshold=calibrated", "--set", "training.eval_every=3"],
        ["left", "right"],
    ),
    "triplet_mined": (
        "triplet_digits_mined",
        ["--set", "data.sampler.examples_per_class=2", "--set", "training.retrieval_eval=true"],
        ["item"],
    ),
    "multiview": (
        "multiview_digits",
        ["--set", "model.tower.sharing=grouped", "--set", "model.tower.groups=[[0, 1], [2]]"],
        ["view0", "view2"],
    ),
    "two_tower": ("two_tower_retrieval", [], ["query", "candidate"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")

    def train(key: str) -> Path:
        config, extra, _ = RUNS[key]
        run = root / key
        done = dist_share("train", str(CONFIGS / f"{config}.yaml"), "--run-dir", str(run),
                          *SHORT, *extra, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return run

    # Two at a time: most of a short run is TensorFlow's start on one core.
    keys = list(RUNS)
    for pair in (keys[:2], keys[2:]):
        background.concurrently(*(lambda k=k: train(k) for k in pair))
    return {key: root / key for key in keys}


def _last_eval(run: Path) -> dict:
    return metrics(run, "eval")[-1]


def test_training_can_evaluate_retrieval_at_every_evaluation(runs: dict[str, Path]) -> None:
    (first, *_) = metrics(runs["triplet_mined"], "eval")
    assert first["step"] == 3 and first["retrieval/corpus"] == 64  # data.eval_examples digits
    assert 0 < first["retrieval/hit_rate@10"] <= 1 and first["retrieval/seconds"] > 0
    (plain, *_) = metrics(runs["two_tower"], "eval")
    assert not [k for k in plain if k.startswith("retrieval/")]  # off by default


# -- export --tower --------------------------------------------------------------------------
def test_every_tower_export_reloads_and_matches_the_full_model(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    targets = [(key, tower) for key, (_, _, towers) in RUNS.items() for tower in towers]

    def export(key: str, tower: str) -> None:
        done = dist_share("export", str(runs[key]), "--tower", tower)
        assert done.returncode == 0, done.stderr
        assert f"exported the {tower} tower of step 3" in done.stdout

    # Two at a time (each export is mostly TensorFlow's start on one core); different runs'
    # or different towers' directories, so they never write the same place.
    for pair in (targets[i : i + 2] for i in range(0, len(targets), 2)):
        background.concurrently(*(lambda k=k, t=t: export(k, t) for k, t in pair))
    targets = [f"{runs[key]}:{tower}" for key, tower in targets]
    result = tmp_path / "check.json"
    subprocess.run([sys.executable, str(WORKERS / "tower_export_check.py"), str(result), *targets],
                   check=True, timeout=300, env=worker_env())  # fmt: skip
    checks = json.loads(result.read_text())
    for target, check in checks.items():
        name = target.rsplit(":", 1)[1]
        assert check["saved_model"] <= 1e-6 and check["keras"] <= 1e-6, (target, check)
        assert check["rows"] > 1
        description = check["tower_json"]
        assert check["signature_inputs"] == sorted(description["inputs"]), target
        assert description["tower"] == name and description["step"] == 3
    two_tower = str(runs["two_tower"])
    # The query tower takes the query's features only; the candidate tower the candidate's.
    assert checks[f"{two_tower}:query"]["signature_inputs"] == ["query_history", "query_user"]
    assert checks[f"{two_tower}:candidate"]["signature_inputs"] == ["candidate_item"]
    siamese = checks[f"{runs['siamese']}:left"]["tower_json"]
    assert siamese["similarity"] == "dot"  # cosine head: unit-length embeddings
    assert siamese["decision_threshold"] == pytest.approx(
        _last_eval(runs["siamese"])["calibrated_threshold"]
    )


def test_an_unknown_tower_is_one_line_listing_the_towers(runs: dict[str, Path]) -> None:
    for command in (["export"], ["embed", "--out", "unused"]):
        done = dist_share(command[0], str(runs["two_tower"]), "--tower", "item", *command[1:])
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"dist-share {command[0]}: error: --tower: two_tower models have no tower 'item'; "
            "the towers are query, candidate"
        )
        assert not (runs["two_tower"] / "towers" / "item").exists()
        assert not Path("unused").exists()


def test_embed_and_retrieval_need_a_checkpoint(tmp_path: Path, runs: dict[str, Path]) -> None:
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["siamese"] / "config.yaml").read_text())
    done = dist_share("embed", str(empty), "--out", str(tmp_path / "emb"))
    assert done.returncode == 2
    assert "has no checkpoint to embed" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "emb").exists()


# -- embed -----------------------------------------------------------------------------------
def _embed(run: Path, out: Path, *args: str, launcher: str = "local") -> str:
    argv = [EXE, "embed", str(run), "--out", str(out), "--part-size", "64", *args]
    if launcher == "horovod":
        command = local_horovodrun_command(2, [*argv, "--strategy", "horovod"])
        return run_job(command, timeout=300, cwd=ROOT).check().output
    if launcher == "multiworker":
        results = run_local_multiworker(2, [*argv, "--strategy", "multiworker"], 300, cwd=ROOT)
        return "".join(r.check().output for r in results)
    return run_job(argv, timeout=300, cwd=ROOT).check().output


def test_embed_writes_every_id_once_with_the_tower_s_vectors(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    said = _embed(runs["siamese"], out)
    ids, vectors, classes = read_embeddings(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tower"] == "right" and manifest["step"] == 3
    assert manifest["count"] == len(ids) == len(vectors) and manifest["dimension"] == 32
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # every image of the split once
    assert set(classes.tolist()) == set(range(10))  # digits: the gallery has its classes
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # cosine head
    assert f"in {len(manifest['parts'])} parts" in said
    # A rerun of the same command finds every part done and writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.npz")}
    again = _embed(runs["siamese"], out)
    assert f"embedded 0 parts (0 rows), {len(before)} already done" in again
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.npz")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["horovod", "multiworker"])
def test_embed_on_two_processes_equals_one(
    launcher: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    local, shared = tmp_path / "local", tmp_path / launcher
    _embed(runs["two_tower"], local, "--tower", "candidate")
    said = _embed(runs["two_tower"], shared, "--tower", "candidate", launcher=launcher)
    assert "process 0: embedded 16 parts" in said and "process 1: embedded 16 parts" in said
    ids, vectors, _ = read_embeddings(shared)
    local_ids, local_vectors, _ = read_embeddings(local)
    np.testing.assert_array_equal(ids, np.arange(2000))  # the catalogue: every item id once
    np.testing.assert_array_equal(ids, local_ids)
    np.testing.assert_allclose(vectors, local_vectors, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_killed_embed_job_reruns_without_redoing_finished_parts(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.npz"
    np.savez(corpus, right=rng.random((300_000, 8, 8, 1), np.float32))
    out = tmp_path / "emb"
    argv = [EXE, "embed", str(runs["siamese"]), "--out", str(out), "--corpus", str(corpus),
            "--part-size", "2000"]  # fmt: skip
    kill_when(argv, lambda: len(list(out.glob("part-*.npz"))) >= 3, timeout=240, cwd=ROOT)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.npz")}
    assert 3 <= len(finished) < 150, "the job was killed midway"
    assert not (out / "manifest.json").exists()
    # A SIGKILL mid-write can leave the part being written as a hidden temporary (no process
    # can remove it then), never under a part's name; the rerun removes it.
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert all(re.fullmatch(r"\.part-\d{5}-of-00150\.npz\..+\.tmp", n) for n in hidden), hidden
    again = run_job(argv, timeout=300, cwd=ROOT).check().output
    assert f"{len(finished)} already done" in again
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a partial file was left"
    for name, stamp in finished.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp, name
    ids, _, _ = read_embeddings(out)
    np.testing.assert_array_equal(ids, np.arange(300_000))


def test_embed_bad_corpus_and_another_run_s_output_are_one_line(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, right=np.zeros((5, 9, 9, 1), np.float32))
    done = dist_share("embed", str(runs["siamese"]), "--out", str(tmp_path / "e1"),
                      "--corpus", str(bad))  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"dist-share embed: error: corpus {bad}: stream 'right' has shape [9, 9, 1] per row, "
        "the right tower expects [8, 8, 1]"
    )
    np.savez(bad, left=np.zeros((5, 8, 8, 1), np.float32))
    done = dist_share("embed", str(runs["siamese"]), "--out", str(tmp_path / "e1"),
                      "--corpus", str(bad))  # fmt: skip
    assert done.returncode == 2 and "no stream 'right'" in done.stderr
    assert not (tmp_path / "e1").exists()
    out = tmp_path / "e2"
    _embed(runs["siamese"], out)
    manifest = (out / "manifest.json").read_text()
    done = dist_share("embed", str(runs["triplet_mined"]), "--out", str(out), "--part-size", "64")
    assert done.returncode == 2, done.stderr
    assert f"--out: {out} holds other embeddings (run {runs['siamese']}, tower right" in done.stderr
    assert (out / "manifest.json").read_text() == manifest  # nothing lost
    done = dist_share("embed", str(runs["triplet_mined"]), "--out", str(out), "--part-size", "64",
                      "--overwrite")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["tower"] == "item"


def test_a_full_disk_while_exporting_or_embedding_is_one_line_and_keeps_what_was_there(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=2m") as small:
        # Leave 150 KB: the query tower's export (about 1 MB) does not fit, nor do the
        # catalogue's 4 parts of 64 KB.
        stat = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 150 * 1024))
        out = small / "tower"
        done = dist_share("export", str(runs["two_tower"]), "--tower", "query", "--out", str(out))
        assert done.returncode == 1
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"dist-share export: error: could not write the query tower of "
                               f"step 3 to {out}: ")  # fmt: skip
        assert "No space left on device" in line and "no export existed there" in line
        assert [p.name for p in small.iterdir()] == ["filler"]  # nothing temporary left
        emb = small / "emb"
        done = dist_share("embed", str(runs["two_tower"]), "--out", str(emb),
                          "--part-size", "500")  # fmt: skip
        assert done.returncode == 1
        (line,) = done.stderr.strip().splitlines()
        assert "could not write the candidate embeddings of step 3" in line
        assert "the parts already written are kept: rerun the same command to finish" in line
        assert not [p for p in emb.iterdir() if p.name.startswith(".")]
        (small / "filler").unlink()
        done = dist_share("embed", str(runs["two_tower"]), "--out", str(emb),
                          "--part-size", "500")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "already done" in done.stdout and (emb / "manifest.json").is_file()


# -- evaluate --retrieval ----------------------------------------------------------------------
def _evaluate(run: Path, *args: str) -> None:
    done = dist_share("evaluate", str(run), "--retrieval", *args)
    assert done.returncode == 0, done.stderr


RETRIEVAL_KEYS = ("recall@1", "recall@10", "recall@100", "hit_rate@1", "map@100", "ndcg@10")


@pytest.mark.multiprocess
def test_retrieval_metrics_are_the_same_under_every_strategy(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    for key in ("siamese", "two_tower"):
        # A copy of the run per strategy: the evaluations append to their own metrics.jsonl.
        copies = {}
        for strategy in ("local", "mirrored", "horovod"):
            copies[strategy] = tmp_path / f"{key}_{strategy}"
            shutil.copytree(runs[key], copies[strategy])

        background.concurrently(
            lambda copies=copies: _evaluate(copies["local"]),
            lambda copies=copies: _evaluate(copies["mirrored"], "--strategy", "mirrored",
                                            "--set", "strategy.num_cpu_devices=2"),
        )  # fmt: skip
        command = local_horovodrun_command(
            2, [EXE, "evaluate", str(copies["horovod"]), "--retrieval", "--strategy", "horovod"]
        )
        run_job(command, timeout=300, cwd=ROOT).check()
        want, got_mirrored, got_horovod = (
            _last_eval(copies[s]) for s in ("local", "mirrored", "horovod")
        )
        assert want["retrieval/queries"] > 10
        for name in RETRIEVAL_KEYS:
            assert got_mirrored[f"retrieval/{name}"] == want[f"retrieval/{name}"], (key, name)
            assert got_horovod[f"retrieval/{name}"] == want[f"retrieval/{name}"], (key, name)
        if key == "siamese":  # and the pair calibration, over every eval pair
            for name in ("roc_auc", "eer", "calibrated_threshold", "calibrated_accuracy"):
                for got in (got_mirrored, got_horovod):
                    assert got[name] == pytest.approx(want[name], abs=1e-6), name


def test_retrieval_with_a_faiss_index_reports_its_recall_against_exact(
    runs: dict[str, Path],
) -> None:
    done = dist_share("evaluate", str(runs["triplet_mined"]), "--retrieval", "--index", "faiss")
    assert done.returncode == 0, done.stderr
    record = _last_eval(runs["triplet_mined"])
    assert 0.5 <= record["retrieval/faiss_recall@10"] <= 1.0
    assert record["retrieval/faiss_queries_per_second"] > 0
    assert record["retrieval/exact_queries_per_second"] > 0
    done = dist_share("evaluate", str(runs["triplet_mined"]), "--index", "faiss")
    assert done.returncode == 2 and "--index compares" in done.stderr
