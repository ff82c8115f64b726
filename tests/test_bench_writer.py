"""``benchmarks.writer`` (``scripts/bench.py``): a partial run rewrites its section and keeps what it did not measure."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import writer as bench


def _figures(path: Path, name: str) -> dict:
    text = path.read_text()
    section = text[text.index(f"<!-- bench:{name} -->"): text.index(f"<!-- /bench:{name} -->")]
    return json.loads(section[section.index("```json") + 7: section.rindex("```")])


def test_partial_run_keeps_the_other_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n\nhand-written summary\n")
    bench.write_section("diffusion", "python scripts/bench.py diffusion", {"peer": 1.3, "mapo": 0.8, "threads": 1})
    bench.write_section("reno", "python scripts/bench.py reno", {"iteration": 1.05})
    bench.write_section("diffusion", "python scripts/bench.py diffusion --part peer", {"peer": 1.33, "threads": 1})
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "hand-written summary" in text and text.count("<!-- bench:diffusion -->") == 1
    figures = _figures(tmp_path / "BENCHMARKS.md", "diffusion")
    assert figures["peer"] == 1.33 and figures["mapo"] == 0.8
    assert list(figures["kept_from_earlier_run"]) == ["mapo"]
    assert figures["kept_from_earlier_run"]["mapo"].startswith("python scripts/bench.py diffusion (")
    assert "--part peer" in text.split("<!-- bench:diffusion -->")[1].split("\n")[3]
    assert _figures(tmp_path / "BENCHMARKS.md", "reno") == {"iteration": 1.05}
    # a second partial run keeps the original provenance of what it still did not measure
    bench.write_section("diffusion", "python scripts/bench.py diffusion --part peer", {"peer": 1.34})
    again = _figures(tmp_path / "BENCHMARKS.md", "diffusion")
    assert again["kept_from_earlier_run"]["mapo"] == figures["kept_from_earlier_run"]["mapo"]
    assert again["threads"] == 1 and again["peer"] == 1.34
