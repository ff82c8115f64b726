"""``push_to_hub`` at the end of training uploads the folder a user loads, with its card (the Hub itself is
unreachable here: a stand-in for ``huggingface_hub.HfApi`` records what would be uploaded)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
from PIL import Image

from mmalign.config import load_config
from mmalign.pairs import PreferencePair, write_pairs


class _FakeApi:
    uploads: list[tuple[str, str, list[str]]] = []

    def __init__(self, token=None) -> None:  # noqa: ANN001
        pass

    def create_repo(self, repo_id, private=True, exist_ok=False):  # noqa: ANN001, ANN201
        assert private and exist_ok
        return repo_id

    def upload_folder(self, folder_path, repo_id):  # noqa: ANN001, ANN201
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        _FakeApi.uploads.append((str(folder_path), repo_id, files))
        return f"https://hub.example/{repo_id}/commit/1"


def test_vlm_training_pushes_the_adapter_folder(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    from mmalign.tiny import cached_tiny
    from vision.train import VLMTrainConfig, run

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.uploads.clear()
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "media").mkdir(parents=True)
    pairs = []
    for i in range(2):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / f"data/media/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube", "a blue dog", [f"media/{i}.png"], []))
    write_pairs(tmp_path / "data", pairs)
    cfg = load_config(VLMTrainConfig, [
        "--model", str(cached_tiny("llava")), "--data", str(tmp_path / "data"), "--push_to_hub", "me/tiny-dpo",
        "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "1", "--train.batch_size", "2",
        "--train.lora_r", "4", "--train.progress", "false", "--train.plot", "false", "--train.trackers", "[]",
    ])
    run(cfg)
    ((folder, repo, files),) = _FakeApi.uploads
    assert repo == "me/tiny-dpo" and Path(folder) == tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "pushed" in capsys.readouterr().out


def test_no_push_without_the_flag(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from vision.train import VLMTrainConfig

    assert load_config(VLMTrainConfig, ["--model", "m", "--data", "d"]).push_to_hub is None


def test_diffusion_training_pushes_the_lora_folder(tmp_path, monkeypatch, write_image_pairs) -> None:  # noqa: ANN001
    from diffusion.train import DiffusionTrainConfig, run

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.uploads.clear()
    write_image_pairs(tmp_path / "data", 2)
    configs = Path(__file__).resolve().parents[1] / "scripts" / "configs"
    cfg = load_config(DiffusionTrainConfig, [
        "--config", str(configs / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "run"), "--push_to_hub", "me/tiny-sd-dpo", "--grid_steps", "0",
        "--train.max_steps", "1", "--train.batch_size", "2", "--train.grad_accum", "1", "--train.save_every", "0",
        "--train.trackers", "[]", "--train.progress", "false", "--train.plot", "false",
    ])
    run(cfg)
    ((folder, repo, files),) = _FakeApi.uploads
    assert repo == "me/tiny-sd-dpo" and Path(folder) == tmp_path / "run" / "lora"
    assert "README.md" in files and any(f.endswith(".safetensors") for f in files)


def test_video_training_pushes_the_adapter_folder(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import pytest

    pytest.importorskip("av")
    from video.frames import write_video
    from video.synthetic import moving_square_clip
    from video.train import VideoTrainConfig, run

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.uploads.clear()
    write_video(tmp_path / "data" / "media" / "clip.mp4", moving_square_clip(4, size=(32, 32)), fps=4)
    pairs = [PreferencePair(f"p{i}", "where does the square move?", "to the right", "it stays", ["media/clip.mp4"], [])
             for i in range(2)]
    write_pairs(tmp_path / "data", pairs)
    cfg = load_config(VideoTrainConfig, [
        "--model", "tiny:llava_next_video", "--data", str(tmp_path / "data"), "--num_frames", "4",
        "--push_to_hub", "me/tiny-video-dpo", "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "1",
        "--train.batch_size", "2", "--train.lora_r", "4", "--train.progress", "false", "--train.plot", "false",
        "--train.trackers", "[]",
    ])
    run(cfg)
    ((folder, repo, files),) = _FakeApi.uploads
    assert repo == "me/tiny-video-dpo" and Path(folder) == tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "pushed" in capsys.readouterr().out
