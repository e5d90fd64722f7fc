"""The benchmark harness works: one quick run of every benchmark writes JSON, PNG and docs.

No timing is asserted (the cores are shared); what is asserted is structure, and the byte
counts of bench_comm, which are exact and follow from the models, not from the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, run_all
from tests.helpers.paths import ROOT as REPO

EARLIER = "(from an earlier run) "
EXPECTED_COLUMNS = {
    "comm": {"case", "streams", "batch", "bytes_per_step", "relative"},
    "overhead": {"case", "trainer_ex_per_s", "plain_ex_per_s", "trainer_over_plain"},
    "scaling": {"case", "launcher", "processes", "replicas", "examples_per_s"},
    "mining": {"objective", "triplet_accuracy", "recall_at_1"},
    "corrections": {"variant", "recall_at_10", "recall_at_100"},
    "objective_cost": {"option", "ratio", "added_ms", "predicted_added_ms"},
    "logging": {"case", "on_over_bare", "profiled_inside_over_bare", "profiled_after_over_bare"},
    "precision": {"variant", "ms_per_step", "speed_over_float32", "compiled"},
}


def test_markdown_table_and_docs_section_keep_hand_written_text(tmp_path: Path) -> None:
    table = common.markdown_table([{"a": 1, "b": 2.5}, {"a": 12345, "c": "x"}])
    assert table.splitlines()[0] == "| a | b | c |"
    assert "12,345" in table and "2.500" in table

    docs = tmp_path / "PERF.md"
    docs.write_text(
        "# Perf\n\nanalysis before\n\n" + run_all.BEGIN + "\nold\n" + run_all.END + "\nafter\n"
    )
    run_all.update_docs(docs, run_all.BEGIN + "\nnew table\n" + run_all.END + "\n")
    text = docs.read_text()
    assert "analysis before" in text and "after" in text
    assert "new table" in text and "old" not in text
    assert text.count(run_all.BEGIN) == 1


def test_plot_without_a_spec_and_with_grouped_series(tmp_path: Path) -> None:
    rows = [
        {"case": "a", "n": 1, "v": 2.0},
        {"case": "a", "n": 2, "v": 3.0},
        {"case": "b", "n": 1, "v": 1.0},
    ]
    common.plot_result("generic", {"table": rows}, tmp_path / "generic.png")
    spec = {"x": "n", "y": ["v"], "group": ["case"], "logx": True}
    common.plot_result("lines", {"table": rows, "plot": spec}, tmp_path / "lines.png")
    for name in ("generic", "lines"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_info_names_cpu_versions_and_threads() -> None:
    m = common.machine_info()
    assert m["cpu_model"] and m["logical_cores"] >= 1
    assert m["tensorflow"] and m["horovod"]
    assert "TF_NUM_INTRAOP_THREADS" in m["thread_env"]


def test_discover_finds_every_bench_module() -> None:
    names = run_all.discover()
    assert {"comm", "overhead", "scaling"} <= set(names)
    assert names == sorted(names)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_run_all_quick_writes_results_plots_and_docs(tmp_path: Path) -> None:
    # Sixteen benchmarks, several of them starting 2-process jobs (each pays TensorFlow's start).
    # Quick mode proves the harness, not the numbers, so the benchmarks run as two `--only`
    # halves side by side (one run alone leaves a core idle while a process starts); a third
    # run of `comm` then writes the docs, taking the others' tables from the results directory.
    results, docs = tmp_path / "results", tmp_path / "PERFORMANCE.md"
    cmd = [sys.executable, "-m", "benchmarks.run_all", "--quick", "--results-dir", str(results)]
    halves = [
        "coupled_cost,corrections,input,mining,overhead,precision,retrieval,roofline",
        "batched_sets,folding,logging,negatives,objective_cost,scaling,scaling_model",
    ]
    assert sorted(",".join([*halves, "comm"]).split(",")) == run_all.discover()
    logs = [tmp_path / f"half{i}.log" for i in range(2)]
    procs = []
    for half, log in zip(halves, logs, strict=True):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen([*cmd, "--only", half, "--no-docs"], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            )  # fmt: skip
    try:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.wait(timeout=780) == 0, log.read_text()[-6000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = subprocess.run(
        [*cmd, "--only", "comm", "--docs", str(docs)],
        capture_output=True, text=True, timeout=100, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]

    names = run_all.discover()
    for name in names:
        data = json.loads((results / f"{name}.json").read_text())
        assert "error" not in data, data.get("error")
        assert data["quick"] is True
        assert data["machine"]["cpu_model"] and data["machine"]["tensorflow"]
        assert data["table"], f"{name}: empty table"
        assert (results / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        missing = EXPECTED_COLUMNS.get(name, set()) - set(data["table"][0])
        assert not missing, f"{name}: table lacks {missing}"

    text = docs.read_text()
    assert run_all.BEGIN in text and run_all.END in text
    assert "--quick" in text and common.cpu_model() in text
    for name in names:
        assert f"### {name}" in text
        assert f"![{name}](img/{name}.png)" in text  # the plot travels with the page
        assert (docs.parent / "img" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # --render-only rewrites the section from those results, naming the run that made them.
    again = tmp_path / "again" / "PERFORMANCE.md"
    assert run_all.main(["--render-only", "--results-dir", str(results), "--docs", str(again)]) == 0
    rendered = again.read_text()
    assert "Command: `python -m benchmarks.run_all --quick" in rendered
    # The comm run marked the tables it did not make; render-only names every run instead.
    assert text.count(EARLIER) == len(names) - 1
    body = rendered.split("Generated:")[1].split("\n", 1)[1]
    assert body == text.split("Generated:")[1].split("\n", 1)[1].replace(EARLIER, "")

    # The byte counts are exact: a shared tower sends its parameters once whatever N is,
    # separate towers N times; dedup never sends more than the naive IndexedSlices.
    comm = json.loads((results / "comm.json").read_text())
    towers = {(r["sharing"], r["streams"]): r["bytes_per_step"] for r in comm["towers"]}
    one = towers[("shared", 1)]
    for (sharing, n), nbytes in towers.items():
        assert nbytes == (one if sharing == "shared" else n * one), (sharing, n, nbytes)
    vocab, dim = comm["params"]["vocab"], comm["params"]["dim"]
    for r in comm["embeddings"]:
        assert r["dense_bytes"] == vocab * dim * 4
        assert r["naive_bytes"] == r["lookups"] * (dim * 4 + 4)  # float32 row + int32 index
        assert r["dedup_bytes"] == r["distinct_ids"] * (dim * 4 + 4)
        assert r["framework_bytes"] <= r["naive_bytes"]

    overhead = json.loads((results / "overhead.json").read_text())
    assert all(r["trainer_ex_per_s"] > 0 and r["plain_ex_per_s"] > 0 for r in overhead["table"])
    scaling = json.loads((results / "scaling.json").read_text())
    assert {r["replicas"] for r in scaling["table"]} >= {2}
    # The scaling model's link fit comes from the probe its first 2-process job ran.
    model = json.loads((results / "scaling_model.json").read_text())
    assert [p["bytes"] for p in model["link_here"]["points"]] == [8, 65536, 1048576]
    assert model["link_here"]["bandwidth_bytes_per_s"] > 0


def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "TensorFlow sees no GPU on this machine; nothing to check" in done.stdout
    assert json.loads(out.read_text()) == {"gpus": 0, "checks": []}
    assert "gpu_check" not in run_all.discover()  # a check to run by hand, not a benchmark


def test_gpu_check_table_reports_each_check() -> None:
    from benchmarks.gpu_check import Checks

    checks = Checks()
    assert checks.run("adds", lambda: f"{1 + 1}") == "2"
    assert checks.run("divides", lambda: 1 / 0) is None
    assert [r["status"] for r in checks.rows] == ["PASS", "FAIL"]
    table = checks.table().splitlines()
    assert table[0].split() == ["PASS", "adds", "2"]
    assert table[1].startswith("FAIL  divides") and "ZeroDivisionError" in table[1]
