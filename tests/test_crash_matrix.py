"""``benchmarks.crash_matrix`` (``scripts/crash_matrix.py``): its verdicts are bitwise, and its metrics check catches a step logged twice."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks import crash_matrix


def test_weights_compared_bitwise_and_metrics_one_row_per_step(tmp_path):
    """-0.0 == 0.0 and NaN != NaN for ``==``; bit for bit it is the other way round. A resume that
    logged step 2 twice, or a value that changed, is a difference."""
    ref, same, signed = tmp_path / "ref.safetensors", tmp_path / "same.safetensors", tmp_path / "signed.safetensors"
    save_file({"w": torch.tensor([0.0, float("nan"), 1.5]), "b": torch.ones(2)}, str(ref))
    save_file({"w": torch.tensor([0.0, float("nan"), 1.5]), "b": torch.ones(2)}, str(same))
    save_file({"w": torch.tensor([-0.0, float("nan"), 1.5]), "b": torch.ones(2, dtype=torch.float64)}, str(signed))
    assert crash_matrix.compare_safetensors(ref, same) == []
    problems = crash_matrix.compare_safetensors(ref, signed)
    assert [p.split(":")[0] for p in problems] == ["b", "w"]  # dtype of b, sign bit of w
    assert crash_matrix.compare_safetensors(ref, tmp_path / "missing.safetensors") == ["missing.safetensors: missing"]

    def metrics(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    rows = [{"step": s, "loss": 0.5 + s, "seconds": 0.1 * s} for s in (1, 2, 3)]
    ref_rows = metrics("ref.jsonl", rows)
    assert crash_matrix.check_metrics(ref_rows, metrics("slower.jsonl", [{**r, "seconds": 9.0} for r in rows]), 3) == []
    twice = crash_matrix.check_metrics(ref_rows, metrics("twice.jsonl", rows[:2] + rows[1:]), 3)
    assert len(twice) == 1 and "twice: [2]" in twice[0]
    changed = crash_matrix.check_metrics(ref_rows, metrics("changed.jsonl", [*rows[:2], {**rows[2], "loss": 0.0}]), 3)
    assert changed == ["metrics.jsonl step 3: values differ from the reference (loss)"]
