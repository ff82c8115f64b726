"""BENCHMARKS.md: each section's figures, the command that made them and the machine, between the
section's markers (``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
