"""Input at scale: does the TFRecord pipeline keep up with the step, and does memory stay flat?

1. ``workers/input_rate.py`` (one process): converts the default Siamese digits data into 8
   TFRecord shards at 1x, 10x and 100x the default size (16384 training pairs), then measures
   the training pipeline of the 1x shards alone (batches/s x batch) against the default
   model's training step (``dist-share train`` fed from memory, and fed from the shards), in
   one TensorFlow runtime. The question: is the pipeline at least 3x faster than the step?
2. ``workers/input_rss.py`` (one process per case): peak RSS of ``dist-share train`` of the
   default config at each scale, fed from memory (``data.train_examples`` = scale x 16384) and
   from the converted shards. Expected: growing with the data for memory, flat for files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import bench_main, run_worker, worker_python_env

NAME = "input"
CONFIG = "configs/siamese_digits.yaml"
DIGITS = 16384


def _rss(scale: int, source: str, shards: Path, steps: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_input_run_") as run_dir:
        args = ["train", CONFIG, "--run-dir", run_dir, "--overwrite"]
        sets = [
            f"training.steps={steps}", "training.eval_every=0", "training.log_every=50",
            "checkpoint.every=0", "logging.tensorboard=false", "logging.progress_bar=false",
        ]  # fmt: skip
        if source == "memory":
            sets.append(f"data.train_examples={scale * DIGITS}")
        else:
            sets += ["data.source=tfrecord", f"data.tfrecord.train={shards / f'x{scale}'}"]
        for s in sets:
            args += ["--set", s]
        (r,) = run_worker("input_rss", args, timeout, env=worker_python_env())
    return {
        "source": source,
        "scale": scale,
        "train_examples": scale * DIGITS,
        "peak_rss_mb": r["peak_rss_mb"],
        "seconds": r["seconds"],
    }


def run(quick: bool = False) -> dict:
    scales = [1] if quick else [1, 10, 100]
    steps, block, repeats = (60, 10, 2) if quick else (300, 50, 8)
    timeout = 900 if quick else 3600
    with tempfile.TemporaryDirectory(prefix="bench_input_shards_") as tmp:
        shards = Path(tmp)
        args = ["--shards", str(shards), "--convert", ",".join(map(str, scales))]
        args += ["--block", str(block), "--repeats", str(repeats), "--steps", str(steps)]
        (rate,) = run_worker("input_rate", args, timeout, env=worker_python_env())
        # Quick mode proves the harness with one process (the files case at 1x), not the claim.
        cases = (
            [(1, "files")] if quick else [(s, src) for s in scales for src in ("memory", "files")]
        )
        rss = [_rss(scale, src, shards, 20 if quick else 100, timeout) for scale, src in cases]
    pipeline, memory, files = (
        rate["pipeline_median"],
        rate["train_memory_median"],
        rate["train_files_median"],
    )
    base = {r["source"]: r["peak_rss_mb"] for r in rss if r["scale"] == 1}
    for r in rss:
        r["rss_vs_1x"] = r["peak_rss_mb"] / base[r["source"]]
    table = [
        {
            "what": "input pipeline alone (TFRecord, 1x, batch 64)",
            "examples_per_s": pipeline,
            "vs_training_step": pipeline / memory,
        },
        {
            "what": "training step, fed from memory",
            "examples_per_s": memory,
            "vs_training_step": 1.0,
        },
        {
            "what": "training step, fed from TFRecord shards",
            "examples_per_s": files,
            "vs_training_step": files / memory,
        },
    ]
    conversions = [
        {k: c[k] for k in ("scale", "train_examples", "bytes", "seconds", "examples_per_sec")}
        for c in rate["conversions"]
    ]
    return {
        "name": NAME,
        "description": (
            "Default Siamese model (conv2d tower on 8x8x1 digit pairs), global batch 64, one "
            "process, TF default threads. Pipeline alone: median over "
            f"{2 * repeats} blocks of {block} batches (before and after the training runs); "
            f"training: median examples/s over metrics.jsonl windows of 50 steps ({steps} steps, "
            "first window dropped). vs_training_step = examples/s / the memory-fed step's. "
            "Compare ratios only: the absolute rates depend on what else the machine runs. "
            "Peak RSS: VmHWM (/proc/self/status) of one `dist-share train` process per case "
            f"({'20' if quick else '100'} steps), data.train_examples = scale x 16384 pairs "
            "(memory) or the same pairs converted into 8 shards (files)."
        ),
        "table": table,
        "extra_tables": {"Peak RSS of a training process": rss, "Conversion": conversions},
        "raw": rate,
        "pipeline_over_step": pipeline / memory,
    }


def main() -> int:
    return bench_main(NAME, run)


if __name__ == "__main__":
    sys.exit(main())
