"""The video commands under ``accelerate launch --multi_gpu --num_processes 2`` (two gloo processes on the CPU):
PhysDPO generation writes one shard per process, merged without loss or duplicate, and training on the
result logs one metrics row per step from a checkpoint that records both processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.pairs import read_pairs
from video.frames import write_video
from video.synthetic import moving_square_clip

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
pytest.importorskip("av")

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_physdpo_then_training_two_processes(tmp_path: Path, launch_two) -> None:
    rows = []
    for i, color in enumerate(COLORS):
        write_video(tmp_path / "videos" / f"{i}.mp4", moving_square_clip(8, size=(32, 48), color=color), fps=8)
        rows.append({"id": f"r{i}", "video": f"videos/{i}.mp4", "question": "what moves in the video",
                     "answer": f"a square of colour {i} moves right", "title": f"square {i} slides"})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs_dir = tmp_path / "pairs"
    launch_two(tmp_path, "make_video_pairs.py", "physdpo", "--model", "tiny:qwen2_5_vl",
            "--physdpo.records", str(tmp_path / "qa.jsonl"), "--physdpo.out_dir", str(pairs_dir),
            "--physdpo.num_frames", "4", "--physdpo.max_new_tokens", "3", "--physdpo.temperature", "1.0",
            "--physdpo.batch_size", "4", "--physdpo.progress", "false")
    shard_ids = {}
    for shard in sorted((pairs_dir / "shards").iterdir()):
        shard_ids[shard.name] = [json.loads(line)["id"] for line in (shard / "pairs.jsonl").read_text().splitlines()]
    assert sorted(shard_ids) == ["rank00000", "rank00001"]
    first, second = set(shard_ids["rank00000"]), set(shard_ids["rank00001"])
    assert not first & second  # distinct shards: record i belongs to rank i % 2
    assert {pid.split("/")[1] for pid in first} == {"r0", "r2"}
    assert {pid.split("/")[1] for pid in second} == {"r1", "r3"}
    merged = [p.id for p in read_pairs(pairs_dir)]
    assert len(merged) == len(set(merged)) == 12 and set(merged) == first | second  # none lost, none twice

    out = tmp_path / "run"
    proc = launch_two(tmp_path, "train_video.py", "--model", "tiny:qwen2_5_vl", "--data", str(pairs_dir),
                   "--num_frames", "4", "--frame_multiple", "2", "--train.output_dir", str(out),
                   "--train.max_steps", "2", "--train.batch_size", "2", "--train.learning_rate", "1e-3",
                   "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [1, 2]
    from mmalign.engine import latest_checkpoint

    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert proc.stdout.count('"output_dir"') == 1  # one summary, from the main process
