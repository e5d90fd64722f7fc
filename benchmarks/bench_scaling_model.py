"""Scaling beyond this machine: predicted throughput and efficiency at 2 to 512 workers.

Inputs, measured here for every config in configs/ (benchmarks/workers/step_profile.py):
the step time of one worker (dist_share Trainer, the config's batch per worker, 1 intra- and
1 inter-op thread) and the bytes its gradients put on the wire, split by collective (dense
gradients; per shared table the deduplicated rows and the table size).

Cost model per step at W workers on links of bandwidth B (bytes/s) and latency a (s per
message), using the classic collective costs (Thakur, Rabenseifner & Gropp, 2005) that
Horovod's Gloo/MPI back ends and NCCL approach:

* all-reduce of n bytes (reduce-scatter + all-gather): 2 log2(W) a + 2 (W-1)/W n / B;
* all-gather of p bytes per worker: log2(W) a + (W-1) p / B;
* per step: one fused all-reduce of the dense gradients, one small all-reduce of the summed
  metrics, and per shared table the count all-reduce plus whichever of all-gather(rows) or
  all-reduce(table) the framework's dense switch picks (`dist_share.distribute.gradients.dense_wins`);
* no overlap of communication with computation: dist_share reduces after the backward pass
  (one fused collective), so step(W) = compute + communication, and weak-scaling efficiency
  is compute / step(W); throughput = W x batch per worker / step(W).

Checked against what can be measured here: the same configs run as 2 Horovod processes, with
the link's latency and bandwidth fitted from an allreduce probe on loopback that the first
2-process job runs after its timed steps (step_profile's ``--probe-sizes``). On 2 shared cores
that check is rough: the two workers also compete for the cores, which the model (one worker
per machine) does not have.

Horovod's published figures (docs/benchmarks.rst of horovod/horovod: 128 servers with 4 Pascal
GPUs each, RoCE-capable 25 Gbit/s network) are shown beside the predictions for the 25 GbE
link: 90 % scaling efficiency for Inception V3 and ResNet-101, 68 % for VGG-16 at 512 GPUs.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, bench_main, median, run_worker, worker_python_env

NAME = "scaling_model"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
WORKERS = [2, 4, 8, 16, 32, 64, 128, 256, 512]
# Link presets: (bandwidth in bytes/s, latency per message in s). The latencies are typical
# figures for the transport (kernel TCP ~ tens of us; RDMA a few us), not measured here.
LINKS = {
    "10GbE TCP": (10e9 / 8, 50e-6),
    "25GbE RoCE": (25e9 / 8, 5e-6),
    "100Gb InfiniBand": (100e9 / 8, 2e-6),
}
PUBLISHED = [  # horovod/horovod docs/benchmarks.rst, 512 Pascal GPUs, 25 Gbit/s RoCE
    ("Horovod published: Inception V3", 512, 0.90),
    ("Horovod published: ResNet-101", 512, 0.90),
    ("Horovod published: VGG-16", 512, 0.68),
]
PROBE_LAUNCH = "mpirun"  # with mpi_yield_when_idle, which the framework's mpirun lines pass
# The 2-process check passes when the measured step is within this factor of the prediction
# (either way): the model leaves out scheduling and the cores the two ranks share here.
AGREEMENT = 1.25


def allreduce_seconds(nbytes: float, workers: int, bandwidth: float, latency: float) -> float:
    """Reduce-scatter + all-gather all-reduce of `nbytes` (0 for one worker)."""
    if workers <= 1:
        return 0.0
    from dist_share.distribute.gradients import ring_allreduce_bytes

    steps = math.ceil(math.log2(workers))
    return 2 * steps * latency + ring_allreduce_bytes(nbytes, workers) / bandwidth


def allgather_seconds(per_worker: float, workers: int, bandwidth: float, latency: float) -> float:
    """All-gather where every worker contributes `per_worker` bytes (0 for one worker)."""
    if workers <= 1:
        return 0.0
    from dist_share.distribute.gradients import allgather_bytes

    return (
        math.ceil(math.log2(workers)) * latency + allgather_bytes(per_worker, workers) / bandwidth
    )


def comm_seconds(profile: dict[str, Any], workers: int, bandwidth: float, latency: float) -> float:
    """Communication time of one step of `profile` (a step_profile result) at `workers`."""
    from dist_share.distribute.gradients import dense_wins

    if workers <= 1:
        return 0.0
    t = allreduce_seconds(profile["dense_bytes"], workers, bandwidth, latency)
    t += allreduce_seconds(64, workers, bandwidth, latency)  # the summed metrics
    for table in profile["tables"]:
        t += allreduce_seconds(8, workers, bandwidth, latency)  # the agreed row count
        if dense_wins(workers * table["rows_bytes"], table["table_bytes"], workers):
            t += allreduce_seconds(table["table_bytes"], workers, bandwidth, latency)
        else:
            t += allgather_seconds(table["rows_bytes"], workers, bandwidth, latency)
    return t


def compute_seconds(profile: dict[str, Any]) -> float:
    """One worker's compute per step: the process CPU time of a 1-thread step. On a shared
    machine the wall time also counts waiting for a core; CPU time of one thread does not."""
    return median(profile["cpu_s_per_step"])


def predict(profile: dict[str, Any], workers: int, bandwidth: float, latency: float) -> dict:
    compute = compute_seconds(profile)
    step = compute + comm_seconds(profile, workers, bandwidth, latency)
    return {
        "step_s": step,
        "efficiency": compute / step,
        "examples_per_s": workers * profile["batch_per_worker"] / step,
    }


def fit_link(points: list[dict[str, float]]) -> tuple[float, float]:
    """Least-squares fit of t = a + n / B to allreduce probe points at W = 2; returns the
    bandwidth B and the per-message latency a / 2 (2 log2(2) = 2 messages per all-reduce)."""
    xs = [p["bytes"] for p in points]
    ys = [p["seconds"] for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    intercept = my - slope * mx
    return 1.0 / max(slope, 1e-15), max(intercept, 0.0) / 2


PROBE_SIZES = {False: "8,4096,65536,524288,2097152,8388608", True: "8,65536,1048576"}


def _shards_for(config: Path, out: Path) -> list[str]:
    """Overrides that point a TFRecord config at shards written from its base config's source
    (a fresh clone has no ``data/``); none for an in-memory config."""
    import subprocess

    import yaml

    from dist_share.run.resolve import load_config

    if load_config(config).data.source != "tfrecord":
        return []
    base = config.parent / yaml.safe_load(config.read_text())["base"]
    convert = [sys.executable, "-m", "dist_share.cli", "data", "convert", str(base)]
    subprocess.run([*convert, "--out", str(out), "--shards", "8"], check=True, timeout=600)
    return ["--set", f"data.tfrecord.train={out}"]


def _profile(
    config: Path, sets: list[str], launch: str, nproc: int, quick: bool, probe: bool = False
) -> dict:
    block, repeats = (5, 2) if quick else (20, 4)
    args = ["--config", str(config), *sets, "--block", str(block), "--repeats", str(repeats)]
    args += ["--warmup", "1", "--intra", "1", "--inter", "1"]
    if nproc > 1:
        args += ["--strategy", "horovod"]
    if probe:
        args += ["--probe-sizes", PROBE_SIZES[quick]]
    results = run_worker("step_profile", args, 900, launch, nproc, worker_python_env(1, 1))
    return next(r for r in results if r["rank"] == 0)


def run(quick: bool = False, only: tuple[str, ...] = ()) -> dict:
    """`only`: config names (file stems) to profile and check; all of configs/ if empty."""
    if quick:
        configs = [c for c in CONFIGS if c.stem == "siamese_digits"]
    else:
        configs = [c for c in CONFIGS if c.stem in only] if only else CONFIGS
    launch = PROBE_LAUNCH
    table, plot_rows, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_model_") as tmp:
        sets = {c: _shards_for(c, Path(tmp) / c.stem) for c in configs}
        twos = {
            c: _profile(c, sets[c], launch, 2, quick, probe=i == 0) for i, c in enumerate(configs)
        }
        ones = {c: _profile(c, sets[c], "single", 1, quick) for c in configs}
    points = twos[configs[0]]["allreduce_points"]
    here_bw, here_lat = fit_link(points)
    for config in configs:
        one, two = ones[config], twos[config]
        name = config.stem
        for link, (bw, lat) in LINKS.items():
            row: dict[str, Any] = {
                "config": name,
                "link": link,
                "compute_ms_1_worker": 1e3 * compute_seconds(one),
                "grad_bytes": one["dense_bytes"] + sum(t["rows_bytes"] for t in one["tables"]),
            }
            for w in WORKERS:
                p = predict(one, w, bw, lat)
                if w in (2, 8, 32, 128, 512):
                    row[f"eff_{w}"] = p["efficiency"]
                plot_rows.append(
                    {"series": f"{name}, {link}", "workers": w, "efficiency": p["efficiency"]}
                )
            row["examples_per_s_512"] = predict(one, 512, bw, lat)["examples_per_s"]
            table.append(row)
        predicted = predict(one, 2, here_bw, here_lat)
        measured_step = median(two["step_s"])
        checks.append(
            {
                "config": name,
                "wall_ms_1_worker": 1e3 * median(one["step_s"]),
                "compute_ms_1_worker": 1e3 * compute_seconds(one),
                "predicted_step_ms_2_workers": 1e3 * predicted["step_s"],
                "measured_step_ms_2_workers": 1e3 * measured_step,
                "measured_over_predicted": measured_step / predicted["step_s"],
                "agrees": 1 / AGREEMENT <= measured_step / predicted["step_s"] <= AGREEMENT,
                "cpu_ms_2_workers": 1e3 * median(two["cpu_s_per_step"]),
                "trainer_comm_bytes_per_step": two.get("trainer_comm_bytes_per_step"),
                "model_bytes_per_step": one["dense_bytes"]
                + sum(t["rows_bytes"] for t in one["tables"]),
            }
        )
    for label, w, eff in PUBLISHED:
        plot_rows.append({"series": label, "workers": w, "efficiency": eff})
    return {
        "name": NAME,
        "description": (
            "Predicted weak-scaling efficiency (compute / (compute + communication), no "
            "overlap) of each config at W workers, from its measured 1-worker compute per step "
            "(process CPU time of a 1 intra + 1 inter-op thread step, the config's batch per "
            "worker: on this shared machine the wall time also counts waiting for a core) and "
            "gradient bytes (dense + deduplicated table rows); "
            "links: "
            + "; ".join(
                f"{k}: {bw * 8 / 1e9:.0f} Gbit/s, {lat * 1e6:.0f} us"
                for k, (bw, lat) in LINKS.items()
            )
            + ". Horovod's published 512-GPU figures (25 Gbit/s RoCE): Inception V3 and "
            "ResNet-101 0.90, VGG-16 0.68."
        ),
        "params": {"workers": WORKERS, "links": LINKS, "probe_launcher": launch},
        "link_here": {"bandwidth_bytes_per_s": here_bw, "latency_s": here_lat, "points": points},
        "table": table,
        "extra_tables": {
            "Check against 2 Horovod processes here (mpirun, yield_when_idle; link fitted from "
            f"an allreduce probe on loopback: {here_bw / 1e9:.2f} GB/s, "
            f"{here_lat * 1e6:.0f} us per message; agrees = measured within {AGREEMENT}x of the "
            "prediction)": checks,
        },
        "plot": {
            "rows": [r for r in plot_rows if "25GbE" in r["series"] or "published" in r["series"]],
            "x": "workers",
            "y": ["efficiency"],
            "group": "series",
            "logx": True,
            "ylabel": "weak-scaling efficiency",
            "title": "Predicted efficiency at 25 Gbit/s RoCE vs Horovod's published 512-GPU figures",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """``--configs a,b`` limits the run to those configs (the check against 2 processes is per
    config, a few minutes each on a loaded machine); results then go to
    scaling_model_<a>_<b>.json, and the full run's file is kept."""
    import argparse
    import functools

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--configs", default="")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    only = tuple(c for c in known.configs.split(",") if c)
    unknown = [c for c in only if c not in {p.stem for p in CONFIGS}]
    if unknown:
        parser.error(f"unknown configs {unknown}; expected some of {[p.stem for p in CONFIGS]}")
    name = f"{NAME}_{'_'.join(only)}" if only else NAME
    return bench_main(name, functools.partial(run, only=only), rest)


if __name__ == "__main__":
    sys.exit(main())
