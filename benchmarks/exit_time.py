"""How long a finished ``dist-share train`` takes to exit: ``python -m benchmarks.exit_time``.

tf.data's autotuning thread sleeps between optimizations, doubling the sleep up to 60 s. An
input iterator still alive when Python exits is destroyed during interpreter teardown, and
there its destructor can wait out that sleep: the run is complete and on disk, but the process
lingers for up to a minute (every rank of a multi-worker job, a Slurm allocation, a CI job).
``CustomLoop.release_input`` frees the iterator when ``train`` returns instead.

Runs side by side, so both see the same machine: the default config as shipped, the same with
``release_input`` turned into a no-op (the behaviour before it), and the ``keras_fit`` loop. Each
must run longer than ~80 s for the sleep to reach its 60 s cap. Prints, per run, the seconds to
its last line ("run directory: ...") and from that line to the process's exit. Not part of
``run_all``: one exit per run, no ratio to a peer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import REPO

CONFIG = REPO / "configs" / "siamese_digits.yaml"
# The run as the CLI does it, optionally with the iterator left to Python's exit.
DRIVER = """
import sys
from dist_share import cli
from dist_share.train.loops.custom import CustomLoop
if sys.argv[1] == "kept":
    CustomLoop.release_input = lambda self: None
sys.exit(cli.main(sys.argv[2:]))
"""
VARIANTS = {
    "custom loop (as shipped)": ("released", []),
    "custom loop, iterator left to exit (before)": ("kept", []),
    "keras_fit loop (as shipped)": ("released", ["--set", "training.loop=keras_fit"]),
}


def _time_exit(mode: str, extra: list[str], steps: int, run_dir: Path, out: dict) -> None:
    argv = [sys.executable, "-c", DRIVER, mode, "train", str(CONFIG), "--run-dir", str(run_dir),
            "--set", f"training.steps={steps}", "--set", "logging.progress_bar=false", *extra]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    last = None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-20:], line]
        if line.startswith("run directory:"):
            last = time.monotonic()
    code = proc.wait(timeout=900)
    end = time.monotonic()
    if code != 0 or last is None:
        raise RuntimeError(f"{mode} {extra}: exit {code}\n{''.join(tail)}")
    out.update(run_s=round(last - t0, 1), exit_after_last_line_s=round(end - last, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000, help="training steps per run")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {name: {} for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="exit_time_") as tmp:
        threads = [
            threading.Thread(
                target=_time_exit,
                args=(mode, extra, args.steps, Path(tmp) / str(i), results[name]),
            )
            for i, (name, (mode, extra)) in enumerate(VARIANTS.items())
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps({"steps": args.steps, "results": results}, indent=2))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
