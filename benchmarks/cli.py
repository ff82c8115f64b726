"""Benchmarks: `python scripts/bench.py {engine,data,reno,diffusion,vision,memory,video,cuda,all}`
(or `python -m benchmarks.cli ...` from the repository root).

Each section measures ratios against a baseline run in the same process (this machine is noisy)
and writes its figures, the command and the machine into BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from benchmarks.writer import write_section

GENERIC_DEFAULTS = {"repeats": 5, "steps": 10, "threads": 1, "batch": 8}
SECTIONS = {
    "engine": ("benchmarks.engine", "bench_engine"),
    "data": ("benchmarks.engine", "bench_data"),  # the engine's DataLoader on real photos, 0 and 2 workers
    "reno": ("benchmarks.reno", "bench_reno"),
    "diffusion": ("benchmarks.diffusion", "bench_diffusion"),
    "vision": ("benchmarks.vision", "bench_vision"),
    "memory": ("benchmarks.memory", "bench_memory"),
    "video": ("benchmarks.video", "bench_video"),
    "cuda": ("benchmarks.cuda", "bench_cuda"),  # GPU only; scripts/device_check.sh runs it on a CUDA machine
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("section", choices=[*SECTIONS, "all"])
    # Unset options are left out, so each section keeps its own defaults.
    ap.add_argument("--repeats", type=int, default=argparse.SUPPRESS, help="repeats (median over them)")
    ap.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="steps per repeat")
    ap.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=argparse.SUPPRESS, help="pairs per step (vision)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args, extra = ap.parse_known_args(argv)  # the rest goes to the section (e.g. diffusion's --peer DIR)
    names = [n for n in SECTIONS if n != "cuda"] if args.section == "all" else [args.section]
    for name in names:
        module, func = SECTIONS[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            print(f"[{name}] not available: {exc}")
            continue
        # A section's own DEFAULTS win over the generic ones; options given on the command line win over both.
        given = {k: v for k, v in vars(args).items() if k in ("repeats", "steps", "threads", "batch")}
        section_args = argparse.Namespace(**{**GENERIC_DEFAULTS, **getattr(mod, "DEFAULTS", {}), **given}, extra=extra)
        figures = getattr(mod, func)(section_args)
        print(f"[{name}]", json.dumps(figures, indent=2, default=str))
        if not args.no_write:
            write_section(name, "python " + " ".join(["scripts/bench.py", name, *argv[1:]]), figures)


if __name__ == "__main__":
    main()
