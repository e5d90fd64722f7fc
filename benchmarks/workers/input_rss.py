"""Peak-memory worker: one ``dist-share train`` in this process, then its peak RSS.

argv: OUT_DIR DIST_SHARE_TRAIN_ARGS...

A fresh process per measurement, because peak RSS only ever grows. The peak is ``VmHWM`` of
/proc/self/status, the high-water mark of this process image only: ``ru_maxrss`` is not, as
Linux carries the parent's high-water mark over fork and exec, so a worker started by a
benchmark driver that had grown to 1.5 GB reported 1.5 GB whatever it did itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss_kb() -> int:
    """This process image's peak resident set size, in kB (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def main() -> None:
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    from dist_share.cli import main as cli_main

    t = time.perf_counter()
    rc = cli_main(argv)
    seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"dist-share {' '.join(argv)} exited with {rc}")
    peak_kb = peak_rss_kb()
    (out_dir / "rank0.json").write_text(
        json.dumps({"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "argv": argv})
    )


if __name__ == "__main__":
    main()
