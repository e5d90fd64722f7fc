"""Input-rate worker: the TFRecord pipeline alone vs the default model's training step, one process.

argv: OUT_DIR --shards DIR [--batch 64] [--block 50] [--repeats 8] [--steps 300] [--convert N,...]

1. ``--convert``: converts the default Siamese digits data at each scale (train_examples =
   N x 16384) into DIR/x<N> with ``dist-share data convert`` (timed: conversion examples/s).
2. Pipeline alone: ``--repeats`` blocks of ``--block`` batches from the training pipeline of
   DIR/x1 (shuffled, parsed, prefetched; batch ``--batch``), before and after the training runs.
3. The training step: ``dist-share train`` of the default config for ``--steps`` steps, fed from
   memory (the default source) and then from the shards; examples/s from metrics.jsonl windows
   (the first window, with tracing, dropped).
All in one process, so that the same TensorFlow runtime and machine load apply to every side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/siamese_digits.yaml"
DIGITS_TRAIN_EXAMPLES = 16384


def pipeline_rate(source, batch: int, block: int, repeats: int) -> list[float]:
    iterator = iter(source.dataset_fn(batch, training=True, seed=0)(None))
    for _ in range(block):  # warm-up: tracing, buffers filled
        next(iterator)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(block):
            next(iterator)
        rates.append(block * batch / (time.perf_counter() - t))
    return rates


def train_rate(
    cli_main, run_dir: Path, steps: int, batch: int, overrides: list[str]
) -> list[float]:
    sets = [
        f"training.steps={steps}", f"training.batch_size={batch}", "training.log_every=50",
        "training.eval_every=0", "checkpoint.every=0", "logging.tensorboard=false",
        "logging.progress_bar=false", *overrides,
    ]  # fmt: skip
    argv = ["train", DEFAULT_CONFIG, "--run-dir", str(run_dir), "--overwrite"]
    for s in sets:
        argv += ["--set", s]
    rc = cli_main(argv)
    if rc != 0:
        raise RuntimeError(f"dist-share {' '.join(argv)} exited with {rc}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    windows = [json.loads(x) for x in lines]
    rates = [w["examples_per_sec"] for w in windows if w.get("split") == "train"]
    return rates[1:]  # the first window includes tracing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--convert", default="1", help="scales to convert, e.g. 1,10,100")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--block", type=int, default=50)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    from dist_share.cli import main as cli_main
    from dist_share.data.records.source import RecordSource

    conversions = []
    for scale in [int(s) for s in args.convert.split(",") if s]:
        out = args.shards / f"x{scale}"
        n = scale * DIGITS_TRAIN_EXAMPLES
        t = time.perf_counter()
        argv = ["data", "convert", DEFAULT_CONFIG, "--out", str(out), "--overwrite"]
        argv += ["--shards", str(args.num_shards), "--set", f"data.train_examples={n}"]
        if cli_main(argv) != 0:
            raise RuntimeError(f"dist-share {' '.join(argv)} failed")
        seconds = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out.glob("*.tfrecord"))
        conversions.append(
            {"scale": scale, "train_examples": n, "seconds": seconds, "bytes": size,
             "examples_per_sec": n / seconds}
        )  # fmt: skip

    source = RecordSource.open(args.shards / "x1", split="train")
    pipeline = pipeline_rate(source, args.batch, args.block, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        memory = train_rate(cli_main, Path(tmp) / "memory", args.steps, args.batch, [])
        files = train_rate(
            cli_main,
            Path(tmp) / "files",
            args.steps,
            args.batch,
            ["data.source=tfrecord", f"data.tfrecord.train={args.shards / 'x1'}"],
        )
    pipeline += pipeline_rate(source, args.batch, args.block, args.repeats)
    result = {
        "pipeline_examples_per_sec": pipeline,
        "train_memory_examples_per_sec": memory,
        "train_files_examples_per_sec": files,
        "pipeline_median": statistics.median(pipeline),
        "train_memory_median": statistics.median(memory),
        "train_files_median": statistics.median(files),
        "conversions": conversions,
        "batch": args.batch,
    }
    (args.out_dir / "rank0.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
