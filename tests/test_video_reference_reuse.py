"""The LoRA-disabled reference reuses the policy's video features (frozen tower, LoRA on the language model):
one video-tower pass per step, bitwise the same training; LoRA on the projector turns the reuse off."""

from __future__ import annotations

from pathlib import Path

import pytest

import video.adapter as video_adapter
from mmalign.engine import TrainConfig, train
from mmalign.pairs import PairDataset, PreferencePair, write_pairs
from video.adapter import VideoLLMAdapter
from video.frames import FrameSampling, write_video
from video.synthetic import moving_square_clip
from vision.train import load_vlm


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("video_reuse")
    pairs = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0)]):
        write_video(root / "media" / f"{i}.mp4", moving_square_clip(6, size=(32, 48), color=color), fps=6)
        pairs.append(PreferencePair(f"p{i}", "what moves in the video", "a square moves right", "a cat sleeps",
                                    [f"media/{i}.mp4"], [f"media/{i}.mp4"]))
    write_pairs(root, pairs)
    return root


def _run(tmp_path: Path, data: Path, name: str, lora_scope: str = "language"):  # noqa: ANN202
    model, processor = load_vlm("tiny:llava_onevision")
    adapter = VideoLLMAdapter(processor, media_root=data, sampling=FrameSampling(num_frames=4), lora_scope=lora_scope)
    calls = []
    original = adapter._encode_videos

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    adapter._encode_videos = counted
    cfg = TrainConfig(output_dir=str(tmp_path / name), reference="lora_disabled", lora_r=4, lora_alpha=8,
                      max_steps=2, batch_size=2,
                      learning_rate=1e-2, trackers=[], progress=False, plot=False)
    losses = [m["loss"] for m in train(model, adapter, PairDataset(data), cfg).metrics]
    return losses, len(calls), adapter.reused_encodings


def test_reference_reuses_video_features_and_trains_the_same(tmp_path, data, monkeypatch) -> None:  # noqa: ANN001
    losses, calls, reused = _run(tmp_path, data, "reuse")
    assert (calls, reused) == (2, 2)
    monkeypatch.setattr(video_adapter, "lora_outside_language", lambda base: True)
    plain, plain_calls, plain_reused = _run(tmp_path, data, "plain")
    assert (plain_calls, plain_reused) == (4, 0)
    assert losses == plain


def test_lora_on_the_projector_turns_reuse_off(tmp_path, data) -> None:  # noqa: ANN001
    _, calls, reused = _run(tmp_path, data, "projector", lora_scope="language+projector")
    assert (calls, reused) == (4, 0)
