"""Interrupted and stale state: generated toy data, the latent cache, online PSO across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import diffusion.toy as toy
from diffusion.train import DiffusionTrainConfig, run
from mmalign.config import load_config
from mmalign.pairs import read_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"


def _toy_argv(out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", "toy:brightness",
            "--output_dir", str(out), "--train.max_steps", "1", "--train.batch_size", "2", "--grid_steps", "0",
            "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false", *extra]


# ------------------------------------------------------------------ generated toy data


class _Killed(BaseException):
    """Stands in for SIGKILL/KeyboardInterrupt in the middle of writing."""


def _kill_after(monkeypatch, calls: int) -> None:
    real = toy.pattern
    seen = {"n": 0}

    def pattern(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > calls:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "pattern", pattern)


@pytest.mark.parametrize("calls", [0, 88])  # killed before the first pair / after 44 of 64 pairs
def test_killed_toy_write_leaves_nothing_behind(monkeypatch, tmp_path, calls):
    folder = tmp_path / "toy_pairs"
    _kill_after(monkeypatch, calls)
    with pytest.raises(_Killed):
        toy.brightness_pairs(folder, 64, seed=0, prefix="toy")
    monkeypatch.undo()
    assert not folder.exists()  # complete or absent
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder either, once cleaned up
    pairs = toy.brightness_pairs(folder, 64, seed=0, prefix="toy")
    assert len(pairs) == 64 and len(read_pairs(folder)) == 64


def test_complete_toy_folder_is_reused_and_verified(tmp_path):
    folder = tmp_path / "toy_pairs"
    first = toy.brightness_pairs(folder, 8, seed=0, prefix="toy")
    marker = json.loads((folder / toy.TOY_MARKER).read_text())
    assert marker["pairs"] == 8
    stamp = (folder / "pairs.jsonl").stat().st_mtime_ns
    again = toy.brightness_pairs(folder, 8, seed=0, prefix="toy")
    assert [p.id for p in again] == [p.id for p in first]
    assert (folder / "pairs.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    # a folder whose marker does not match what is asked for is not silently reused
    with pytest.raises(FileExistsError, match="toy"):
        toy.brightness_pairs(folder, 16, seed=0, prefix="toy")
    assert len(toy.brightness_pairs(folder, 16, seed=0, prefix="toy", replace=True)) == 16


@pytest.mark.parametrize("partial", [0, 44])
def test_run_rebuilds_a_partial_toy_folder(tmp_path, partial):
    """A ``toy_pairs`` folder left by a killed run of the old code (no completeness marker): an empty
    ``pairs.jsonl`` made every later run fail ("no pairs left"), 44 pairs trained on 44 of 64."""
    out = tmp_path / "run"
    folder = out / "toy_pairs"
    if partial:
        toy.brightness_pairs(folder, partial, seed=0, prefix="toy")
        (folder / toy.TOY_MARKER).unlink()
    else:
        folder.mkdir(parents=True)
        (folder / "pairs.jsonl").write_text("")
    run(load_config(DiffusionTrainConfig, _toy_argv(out)))
    assert json.loads((out / "summary.json").read_text())["pairs"] == 64
    assert len(read_pairs(folder)) == 64
