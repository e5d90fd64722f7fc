"""Where the repository's parts are, for the tests and the jobs they start."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
WORKERS = ROOT / "tests" / "workers"
# The CLI of this environment (the tests start it as a user would).
EXE = str(Path(sys.executable).parent / "dist-share")
