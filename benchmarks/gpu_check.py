"""The GPU check: run on a machine with GPUs and dist_share installed, it verifies what could
only be built on CPUs here, prints a PASS/FAIL table and writes JSON.

    python -m benchmarks.gpu_check [--out gpu_check.json] [--steps 50]

Checks: each Horovod process pinned to its own GPU with memory growth on; Horovod built with
NCCL and an allreduce whose result lives on the GPU; MirroredStrategy with a replica on every
GPU; a training step under mixed_float16, mixed_bfloat16 (compute capability 8.0 and up) and
XLA; then the median step time of every shipped config, one GPU and all of them. Without a GPU
it says so and exits 0 (docs/GPU.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# TF_CPP_MIN_LOG_LEVEL quiet, and the repository importable from the workers.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _gpus() -> list[Any]:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def _horovod_worker(out: str) -> None:
    """One process of `horovodrun -np <GPUs>`: its GPUs, memory growth, and an allreduce."""
    import tensorflow as tf

    from dist_share.config.schema import StrategyConfig
    from dist_share.distribute.strategies import get_strategy

    strategy = get_strategy(StrategyConfig(name="horovod"))
    hvd = strategy.hvd
    visible = tf.config.get_visible_devices("GPU")
    x = tf.ones([1024], tf.float32) * float(hvd.rank() + 1)
    y = hvd.allreduce(x, op=hvd.Sum)
    result = {
        "rank": hvd.rank(),
        "local_rank": hvd.local_rank(),
        "visible": [d.name for d in visible],
        "memory_growth": [tf.config.experimental.get_memory_growth(d) for d in visible],
        "nccl_built": bool(hvd.nccl_built()),
        "allreduce_device": y.device,
        "allreduce_value": float(y[0].numpy()),
        "size": hvd.size(),
    }
    Path(f"{out}.{hvd.rank()}.json").write_text(json.dumps(result))


def _train(config: Path, run_dir: Path, steps: int, *args: str) -> dict:
    """`dist-share train` for ``steps`` steps; the last metrics.jsonl training record."""
    cmd = [
        sys.executable, "-m", "dist_share.cli", "train", str(config), "--run-dir", str(run_dir),
        "--steps", str(steps), "--overwrite",
        "--set", "training.eval_every=0", "--set", f"training.log_every={max(1, steps // 2)}",
        "--set", "checkpoint.every=0", "--set", "logging.progress_bar=false", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r or "loss" in r]
    return train[-1] if train else {}


def _loss(record: dict) -> float:
    return float(record.get("train/loss", record.get("loss", float("nan"))))


class Checks:
    """Named results: PASS with a detail, or FAIL with the reason."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Any) -> Any:
        try:
            detail = fn()
            self.rows.append({"check": name, "status": "PASS", "detail": detail})
            return detail
        except Exception as e:  # noqa: BLE001 - every failure is a row of the table
            self.rows.append(
                {"check": name, "status": "FAIL", "detail": f"{type(e).__name__}: {e}"}
            )
            return None

    def table(self) -> str:
        width = max(len(r["check"]) for r in self.rows)
        return "\n".join(
            f"{r['status']:4}  {r['check']:<{width}}  {r['detail']}" for r in self.rows
        )


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_checks(steps: int, work: Path) -> Checks:
    import tensorflow as tf

    gpus = _gpus()
    n = len(gpus)
    checks = Checks()

    def horovod() -> str:
        horovodrun = shutil.which("horovodrun")
        _expect(horovodrun is not None, "horovodrun is not on PATH")
        out = work / "hvd"
        cmd = [horovodrun, "-np", str(n), "-H", f"localhost:{n}", sys.executable, "-m",
               "benchmarks.gpu_check", "--horovod-worker", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, timeout=600, capture_output=True)
        ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(n)]
        pinned = sorted(r["visible"][0] for r in ranks if len(r["visible"]) == 1)
        _expect(len(pinned) == n and len(set(pinned)) == n, f"GPUs per process: {ranks}")
        _expect(all(all(r["memory_growth"]) for r in ranks), "memory growth off")
        _expect(all(r["nccl_built"] for r in ranks), "Horovod was built without NCCL")
        _expect(all("GPU" in r["allreduce_device"] for r in ranks), "allreduce result on CPU")
        want = n * (n + 1) / 2
        _expect(all(r["allreduce_value"] == want for r in ranks), "allreduce sum is wrong")
        return f"{n} processes, one GPU each, memory growth on, NCCL allreduce on the GPU"

    checks.run("horovod: a GPU per process, NCCL allreduce on the GPU", horovod)

    def mirrored_devices() -> str:
        strategy = tf.distribute.MirroredStrategy()
        devices = strategy.extended.worker_devices
        _expect(len(devices) == n and all("GPU" in d for d in devices), str(devices))
        return f"{strategy.num_replicas_in_sync} replicas on {', '.join(devices)}"

    checks.run("mirrored: a replica on every GPU", mirrored_devices)
    config = ROOT / "configs" / "siamese_digits.yaml"
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability") or (0, 0)
    variants = {
        "mirrored step, float32": ("--strategy", "mirrored"),
        "mirrored step, mixed_float16": (
            "--strategy", "mirrored", "--set", "training.precision=mixed_float16"),
        "local step, XLA": ("--set", "training.jit_compile=true"),
    }  # fmt: skip
    if tuple(capability) >= (8, 0):
        variants["mirrored step, mixed_bfloat16"] = (
            "--strategy", "mirrored", "--set", "training.precision=mixed_bfloat16"
        )  # fmt: skip
    for name, args in variants.items():

        def step(args: tuple = args, name: str = name) -> str:
            record = _train(config, work / name.replace(" ", "_"), 10, *args)
            _expect(record and _loss(record) == _loss(record), f"no finite loss: {record}")
            return f"loss {_loss(record):.4f}"

        checks.run(name, step)
    for path in CONFIGS:
        for strategy in ("local", "mirrored") if n > 1 else ("local",):

            def timing(path: Path = path, strategy: str = strategy) -> str:
                run_dir = work / f"time_{path.stem}_{strategy}"
                _train(path, run_dir, steps, "--strategy", strategy)
                lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                times = [json.loads(x).get("train/step_time") for x in lines]
                times = [t for t in times if t]
                _expect(bool(times), "no step_time logged")
                return f"median step {1000 * statistics.median(times):.1f} ms"

            checks.run(f"time {path.stem} ({strategy})", timing)
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON results go")
    p.add_argument("--steps", type=int, default=50, help="steps per timed config")
    p.add_argument("--horovod-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.horovod_worker:
        _horovod_worker(a.horovod_worker)
        return 0
    gpus = _gpus()
    if not gpus:
        print("gpu_check: TensorFlow sees no GPU on this machine; nothing to check (exit 0)")
        Path(a.out).write_text(json.dumps({"gpus": 0, "checks": []}, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        checks = run_checks(a.steps, Path(work))
    print(checks.table())
    Path(a.out).write_text(json.dumps({"gpus": len(gpus), "checks": checks.rows}, indent=1))
    failed = [r for r in checks.rows if r["status"] == "FAIL"]
    print(f"{len(checks.rows) - len(failed)} passed, {len(failed)} failed; results in {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
