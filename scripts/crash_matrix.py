"""Crash matrix: ``python scripts/crash_matrix.py --trials 4``; ``--help`` lists the options. The harness
lives in ``benchmarks.crash_matrix``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.crash_matrix import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
