"""Benchmarks: ``python scripts/bench.py {engine,data,reno,diffusion,vision,memory,video,cuda,all} [options]``;
``--help`` lists the options. The sections live in the ``benchmarks`` package (``benchmarks.cli``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
