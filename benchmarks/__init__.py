"""The benchmarks and the crash matrix: ``python scripts/bench.py <section>`` (see ``benchmarks.cli``),
``python scripts/crash_matrix.py``; each section also runs as ``python -m benchmarks.<section>`` from the
repository root. This package may import mmalign, vision, diffusion and video; they never import it."""
