"""Every entry point under ``accelerate launch --multi_gpu --num_processes 2`` (two gloo processes on the CPU).

Each test runs the user's command as the README writes it and checks what two processes must give:
both ranks seen (``num_processes: 2`` where a checkpoint records it), one metrics row per step,
shards distinct and merged without loss or duplicate, and each output written once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.pairs import PreferencePair, read_pairs, write_pairs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


_FAKE_HUB = """
import json, os
from pathlib import Path

import huggingface_hub


class _Api:
    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=True, exist_ok=False):
        return repo_id

    def upload_folder(self, folder_path, repo_id):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        with open({log!r}, "a") as f:
            f.write(json.dumps({{"folder": str(folder_path), "repo": repo_id, "files": files,
                                 "rank": os.environ.get("RANK")}}) + "\\n")
        return "https://hub.example/" + repo_id


huggingface_hub.HfApi = _Api
"""


def _metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_stic_stage1_two_processes_write_distinct_shards_merged_once(tmp_path, launch_two):
    _images(tmp_path / "images", 6)
    launch_two(tmp_path, "make_pairs.py", "stic", "--model", "tiny:llava",
            "--stic.image_dir", str(tmp_path / "images"), "--stic.out_dir", str(tmp_path / "pairs"),
            "--stic.max_new_tokens", "4", "--stic.batch_size", "2")
    pairs = read_pairs(tmp_path / "pairs")
    ids = [p.id for p in pairs]
    assert len(ids) == len(set(ids)) == 6  # none lost, none twice
    shards = sorted(p.name for p in (tmp_path / "pairs" / "shards").iterdir())
    assert shards == ["rank00000", "rank00001"]
    assert {p.meta["stic"]["shard"] for p in pairs} == {"shards/rank00000", "shards/rank00001"}


def test_vlm_training_two_processes_one_row_per_step(tmp_path, launch_two):
    images = _images(tmp_path / "data" / "media", 8)
    pairs = [PreferencePair(id=f"p{i}", prompt="What is shown?", chosen="a red square", rejected="a blue circle",
                            chosen_media=[f"media/{p.name}"], rejected_media=[f"media/{p.name}"])
             for i, p in enumerate(images)]
    write_pairs(tmp_path / "data", pairs)
    out = tmp_path / "run"
    site = tmp_path / "site"  # the Hub is unreachable: both processes get a stand-in HfApi that records uploads
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAKE_HUB.format(log=str(tmp_path / "uploads.jsonl")))
    launch_two(tmp_path, "train_vlm.py", "--model", "tiny:llava", "--data", str(tmp_path / "data"),
            "--train.output_dir", str(out), "--train.max_steps", "3", "--train.batch_size", "2",
            "--train.trackers", "[]", "--train.progress", "false", "--train.lora_r", "4",
            "--push_to_hub", "me/tiny-dpo", before=site)
    uploads = [json.loads(line) for line in (tmp_path / "uploads.jsonl").read_text().splitlines()]
    assert len(uploads) == 1  # the main process pushes, once, after the adapter and card are written
    assert uploads[0]["repo"] == "me/tiny-dpo" and Path(uploads[0]["folder"]) == out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploads[0]["files"])
    rows = _metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    from mmalign.engine import latest_checkpoint

    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


def test_reno_prompt_file_two_processes_split_batches_and_merge_once(tmp_path, launch_two):
    from mmalign.tiny import cached_tiny

    pipeline = cached_tiny("sd", scheduler="euler")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue car\na green field\n", encoding="utf-8")
    common = ["--pipeline", str(pipeline), "--reward", "redness:1", "--steps", "2", "--height", "16",
              "--width", "16", "--prompts_file", str(tmp_path / "prompts.txt"), "--no_progress"]
    launch_two(tmp_path, "reno.py", *common, "--out", str(tmp_path / "two"))
    two = json.loads((tmp_path / "two" / "rewards.json").read_text())
    assert [r["prompt"] for r in two["per_prompt"]] == ["a red fox", "a blue car", "a green field"]
    assert sorted(p.name for p in (tmp_path / "two" / "batches").iterdir()) == ["00000.json", "00001.json",
                                                                                 "00002.json"]
    from diffusion.cli import reno

    assert reno([*common, "--out", str(tmp_path / "one")]) == 0  # one process: the same images and rewards
    one = json.loads((tmp_path / "one" / "rewards.json").read_text())
    for a, b in zip(one["per_prompt"], two["per_prompt"], strict=True):
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-5)


def test_diffusion_training_two_processes_one_row_per_step_outputs_once(tmp_path, launch_two):
    out = tmp_path / "run"
    proc = launch_two(tmp_path, "train_diffusion.py", "--config", str(ROOT / "scripts" / "configs" /
                   "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", "toy:brightness", "--output_dir", str(out),
                   "--train.max_steps", "3", "--train.batch_size", "2", "--train.grad_accum", "1", "--grid_steps", "0",
                   "--train.trackers", "[]", "--train.progress", "false")
    rows = _metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    from mmalign.engine import latest_checkpoint

    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert proc.stdout.count('"output_dir"') == 1  # one summary, from the main process
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_video_training_two_processes_full_fine_tuning(tmp_path, launch_two):
    """Full fine-tuning of a video LLM under DDP: the weights only images use (LLaVA-OneVision's
    ``image_newline``) get no gradient from a video batch, which DDP refused at the second step before."""
    pytest.importorskip("av")
    from video.frames import write_video
    from video.synthetic import moving_square_clip

    write_video(tmp_path / "data" / "media" / "clip.mp4", moving_square_clip(4, size=(32, 32)), fps=4)
    pairs = [PreferencePair(id=f"p{i}", prompt="Where does the square move?", chosen="to the right",
                            rejected="it stays", chosen_media=["media/clip.mp4"], rejected_media=["media/clip.mp4"])
             for i in range(8)]
    write_pairs(tmp_path / "data", pairs)
    out = tmp_path / "run"
    launch_two(tmp_path, "train_video.py", "--model", "tiny:llava_onevision", "--data", str(tmp_path / "data"),
               "--num_frames", "4", "--train.output_dir", str(out), "--train.max_steps", "3",
               "--train.batch_size", "2", "--train.lora_r", "0", "--train.trackers", "[]",
               "--train.progress", "false", "--train.gradient_checkpointing", "true")  # as the shipped configs
    assert [r["step"] for r in _metric_rows(out)] == [1, 2, 3]
    from mmalign.engine import latest_checkpoint

    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["num_processes"] == 2
    assert (out / "model" / "README.md").is_file()  # saved once, by the main process
