"""Benchmarks: `python scripts/bench.py {engine,data,reno,diffusion,vision,memory,video,all}`.

Each section measures ratios against a baseline run in the same process (this machine is noisy)
and writes its figures, the command and the machine into BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

GENERIC_DEFAULTS = {"repeats": 5, "steps": 10, "threads": 1, "batch": 8}
SECTIONS = {
    "engine": ("bench_engine", "bench_engine"),
    "data": ("bench_engine", "bench_data"),  # the engine's DataLoader on real photos, 0 and 2 workers
    "reno": ("bench_reno", "bench_reno"),
    "diffusion": ("bench_diffusion", "bench_diffusion"),
    "vision": ("bench_vision", "bench_vision"),
    "memory": ("bench_memory", "bench_memory"),
    "video": ("bench_video", "bench_video"),
    "cuda": ("bench_cuda", "bench_cuda"),  # GPU only; scripts/device_check.sh runs it on a CUDA machine
}


def _machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}"


def _old_figures(section: str) -> tuple[dict, str, str]:
    """(figures, command, date) of a section as written before, or empty ones."""
    try:
        figures = json.loads(section[section.index("```json") + 7: section.rindex("```")])
        command = section.split("- command: `", 1)[1].split("`", 1)[0]
        date = section.split("- date: ", 1)[1].split("\n", 1)[0]
    except (ValueError, IndexError):
        return {}, "", ""
    return figures, command, date


def write_section(name: str, command: str, figures: dict) -> None:
    """Write ``figures`` into BENCHMARKS.md between the section's markers. Parts of an earlier run of
    the section that this run did not measure (e.g. ``--part mapo`` leaves the peer comparison alone)
    are kept, and ``kept_from_earlier_run`` names the command and date that produced them."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nWritten by `scripts/bench.py`.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in text and end in text:
        old, old_command, old_date = _old_figures(text[text.index(start): text.index(end)])
        kept = {k: v for k, v in old.items() if k not in figures and k != "kept_from_earlier_run"}
        if kept:
            earlier = old.get("kept_from_earlier_run", {})
            figures = {**figures, **kept, "kept_from_earlier_run": {
                k: earlier.get(k, f"{old_command} ({old_date})") for k in kept}}
    body = (f"{start}\n## {name}\n\n- command: `{command}`\n- machine: {_machine()}\n"
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"```json\n{json.dumps(figures, indent=2, default=str)}\n```\n{end}")
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("section", choices=[*SECTIONS, "all"])
    # Unset options are left out, so each section keeps its own defaults.
    ap.add_argument("--repeats", type=int, default=argparse.SUPPRESS, help="repeats (median over them)")
    ap.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="steps per repeat")
    ap.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=argparse.SUPPRESS, help="pairs per step (vision)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args, extra = ap.parse_known_args()  # the rest goes to the section (e.g. diffusion's --peer DIR)
    names = [n for n in SECTIONS if n != "cuda"] if args.section == "all" else [args.section]
    for name in names:
        module, func = SECTIONS[name]
        try:
            mod = __import__(module)
        except ImportError as exc:
            print(f"[{name}] not available: {exc}")
            continue
        # A section's own DEFAULTS win over the generic ones; options given on the command line win over both.
        given = {k: v for k, v in vars(args).items() if k in ("repeats", "steps", "threads", "batch")}
        section_args = argparse.Namespace(**{**GENERIC_DEFAULTS, **getattr(mod, "DEFAULTS", {}), **given}, extra=extra)
        figures = getattr(mod, func)(section_args)
        print(f"[{name}]", json.dumps(figures, indent=2, default=str))
        if not args.no_write:
            write_section(name, "python " + " ".join(["scripts/bench.py", name, *sys.argv[2:]]), figures)


if __name__ == "__main__":
    main()
