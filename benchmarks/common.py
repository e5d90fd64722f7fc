"""Shared plumbing for the benchmarks: machine description, timing, result files, plots, tables.

Benchmarks compare ratios measured in one run on one machine, so everything here is about making
the two sides of a ratio see the same conditions (same process, interleaved repeats, median) and
about recording the conditions (CPU, cores, versions, threads) next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKERS = BENCH_DIR / "workers"
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"

# Environment variables that decide how many threads TF / oneDNN / OpenMP use; recorded verbatim.
THREAD_ENV = (
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "OMP_NUM_THREADS",
    "TF_ENABLE_ONEDNN_OPTS",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo (platform.processor() is empty on most Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on. Versions come from package metadata so that describing
    the machine never imports (and initialises) TensorFlow or Horovod in the calling process."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
        "keras": _version("keras"),
        "horovod": _version("horovod"),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "load_average": list(os.getloadavg()),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def worker_python_env(intra: int | None = None, inter: int | None = None) -> dict[str, str]:
    """Environment for a benchmark worker process: repo importable, threads pinned if asked.

    The thread counts go through TF's own environment variables (read when the runtime starts)
    *and* OMP_NUM_THREADS, so that a worker cannot silently use more cores than its share.
    """
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if intra is not None:
        env["TF_NUM_INTRAOP_THREADS"] = str(intra)
        env["OMP_NUM_THREADS"] = str(intra)
    if inter is not None:
        env["TF_NUM_INTEROP_THREADS"] = str(inter)
    return env


LAUNCHERS = ("single", "horovodrun", "mpirun", "multiworker")


def run_worker(
    module: str,
    args: Sequence[str],
    timeout: float,
    launch: str = "single",
    num_proc: int = 1,
    env: Mapping[str, str] | None = None,
    mpi_yield: bool = True,
) -> list[dict[str, Any]]:
    """Run ``python -m benchmarks.workers.<module> OUT_DIR *args`` and return every JSON it wrote.

    `launch` picks how: one process, ``horovodrun -np N`` (Gloo), Open MPI ``mpirun -np N``, or
    N local multi-worker processes with TF_CONFIG (all through tests/helpers/processes.py, which kills
    the whole process group on timeout). Workers write one JSON per rank into OUT_DIR; they come
    back in file-name (rank) order. ``mpi_yield=False`` runs ``mpirun`` without
    ``mpi_yield_when_idle`` (which the framework's mpirun lines always pass), to measure it.
    """
    from tests.helpers import processes

    if launch not in LAUNCHERS:
        raise ValueError(f"launch must be one of {LAUNCHERS}, got {launch!r}")
    env = dict(env or {})
    with tempfile.TemporaryDirectory(prefix=f"bench_{module}_") as out:
        argv = [sys.executable, "-m", f"benchmarks.workers.{module}", out, *args]
        if launch == "multiworker":
            jobs = processes.run_local_multiworker(num_proc, argv, timeout, env=env, cwd=str(REPO))
        else:
            if launch == "horovodrun":
                argv = processes.local_horovodrun_command(num_proc, argv)
            elif launch == "mpirun":
                argv = processes.local_mpirun_command(num_proc, argv, yield_when_idle=mpi_yield)
            jobs = [processes.run_job(argv, timeout=timeout, env=env, cwd=str(REPO))]
        for job in jobs:
            job.check()
        files = sorted(Path(out).glob("*.json"))
        if not files:
            raise RuntimeError(f"worker {module} wrote no result:\n{jobs[0].output[-4000:]}")
        return [json.loads(f.read_text()) for f in files]


def train_run(
    config: Path, run_dir: Path, sets: Sequence[str], steps: int, timeout: float
) -> dict[str, Any]:
    """``dist-share train CONFIG`` for `steps` steps into `run_dir` (no progress bar, no
    TensorBoard, one checkpoint at the end); returns its wall seconds and final eval."""
    from tests.helpers import processes

    script = Path(sys.executable).with_name("dist-share")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "dist_share.cli"]
    quiet = ["logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every=0"]
    argv = [*cli, "train", str(config), "--run-dir", str(run_dir), "--steps", str(steps)]
    argv += [a for s in [*quiet, *sets] for a in ("--set", s)]
    t0 = time.perf_counter()
    processes.run_job(argv, timeout=timeout, env=worker_python_env(), cwd=str(REPO)).check()
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["split"] == "eval"][-1]
    return {"run_seconds": seconds, "final_eval": final}


def write_json(result: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=float) + "\n")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_result(name: str, result: Mapping[str, Any], path: Path) -> None:
    """One PNG per benchmark. A benchmark can describe its plot with a ``"plot"`` entry
    ``{"x": col, "y": [cols], "group": col | None, "logy": bool, "title": str}``; without one, the
    first text column labels a bar chart of the first numeric column (so any table plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = dict(result.get("plot") or {})
    # A plot may bring its own long-format rows (e.g. one row per point of a curve).
    rows = list(spec.get("rows") or result.get("table") or [])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if rows and spec.get("x"):
        x, ys = spec["x"], spec.get("y") or []
        group = spec.get("group") or []
        group = [group] if isinstance(group, str) else list(group)

        def key(r: Mapping[str, Any]) -> tuple:
            return tuple(r.get(c) for c in group)

        for g in sorted({key(r) for r in rows}, key=str):
            sel = [r for r in rows if key(r) == g]
            for y in ys:
                pts = [(r[x], r[y]) for r in sel if _is_number(r.get(x)) and _is_number(r.get(y))]
                if not pts:
                    continue
                pts.sort()
                parts = [
                    f"{c}={v}" if _is_number(v) else str(v) for c, v in zip(group, g, strict=True)
                ]
                if len(ys) > 1:
                    parts.append(y)
                label = " ".join(p for p in parts if p not in ("", "None"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel(x)
        if spec.get("logx"):
            ax.set_xscale("log", base=2)
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.set_ylabel(spec.get("ylabel", ", ".join(ys)))
        ax.legend(fontsize=7)
    elif rows:
        text_cols = [k for k, v in rows[0].items() if isinstance(v, str)]
        num_cols = [k for k in rows[0] if any(_is_number(r.get(k)) for r in rows)]
        y = spec.get("y", [num_cols[0]])[0] if num_cols else None
        if y is not None:
            labels = [
                " ".join(str(r.get(c)) for c in text_cols) if text_cols else str(i)
                for i, r in enumerate(rows)
            ]
            values = [r.get(y) if _is_number(r.get(y)) else 0.0 for r in rows]
            ax.barh(range(len(rows)), values)
            ax.set_yticks(range(len(rows)), labels, fontsize=7)
            ax.set_xlabel(y)
    else:
        ax.text(0.5, 0.5, "no rows", ha="center", va="center")
    ax.set_title(spec.get("title", name), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1000:
        return f"{v:,}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def save(name: str, result: Mapping[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` and ``<name>.png``; returns the JSON path."""
    results_dir = Path(results_dir or DEFAULT_RESULTS_DIR)
    json_path = results_dir / f"{name}.json"
    write_json(result, json_path)
    plot_result(name, result, results_dir / f"{name}.png")
    return json_path


def bench_main(name: str, run: Callable[..., dict], argv: Sequence[str] | None = None) -> int:
    """The ``main()`` of a single benchmark module: run it, save JSON + PNG, print the table."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{name}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the harness")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = dict(run(quick=args.quick))
    result.setdefault("machine", machine_info())
    result.setdefault("seconds", time.perf_counter() - t0)
    result.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    result.setdefault("quick", args.quick)
    module = Path(sys.argv[0]).stem  # run as ``python -m benchmarks.<module>``
    result.setdefault("command", " ".join([f"python -m benchmarks.{module}", *sys.argv[1:]]))
    path = save(name, result, args.results_dir)
    print(markdown_table(result.get("table") or []))
    print(f"wrote {path}")
    return 0
