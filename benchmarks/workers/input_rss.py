"""Peak-memory worker: one ``dist-share train`` in this process, then its peak RSS.

argv: OUT_DIR DIST_SHARE_TRAIN_ARGS...

A fresh process per measurement, because peak RSS (``ru_maxrss``, the kernel's high-water
mark of this process) only ever grows.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    from dist_share.cli import main as cli_main

    t = time.perf_counter()
    rc = cli_main(argv)
    seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"dist-share {' '.join(argv)} exited with {rc}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    (out_dir / "rank0.json").write_text(
        json.dumps({"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "argv": argv})
    )


if __name__ == "__main__":
    main()
