"""Video pair formats: our pair folder with video media (files or frame lists) and LLaVA-Hound-DPO records
(JSON list or JSONL, videos as files or frame folders) both load and collate; the converter writes ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmalign.pairs import PairFormatError, PairWriter, PreferencePair, read_pairs
from video.adapter import VideoLLMAdapter
from video.formats import from_llava_hound, load_video_pairs, read_llava_hound
from video.frames import FrameSampling, write_video
from video.synthetic import moving_square_clip

pytest.importorskip("av")


@pytest.fixture()
def hound(tmp_path: Path) -> tuple[Path, Path]:
    videos = tmp_path / "videos"
    write_video(videos / "v1.mp4", moving_square_clip(8, size=(32, 48)), fps=8)
    (videos / "v2").mkdir()
    for i, frame in enumerate(moving_square_clip(5, size=(32, 32), color=(0, 255, 0))):
        Image.fromarray(frame).save(videos / "v2" / f"c{i:02d}.jpg")
    rows = [
        {"id": "v1", "prompt": "<video>\nwhat moves?", "chosen": "a red square", "rejected": "a cat",
         "video": "v1", "chosen_score": 5, "rejected_score": 2, "answer": "a red square moving"},
        {"id": "v1", "prompt": "which way?", "chosen": "right", "rejected": "up", "video": "v1.mp4"},
        {"id": "v2", "prompt": "what colour?", "chosen": "green", "rejected": "red", "video": "v2"},
    ]
    (tmp_path / "hound.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hound.json").write_text(json.dumps(rows))
    return tmp_path / "hound.jsonl", videos


def test_llava_hound_reads_in_place(hound) -> None:  # noqa: ANN001
    src, videos = hound
    pairs, skipped = read_llava_hound(src, video_root=videos)
    assert skipped == [] and [p.id for p in pairs] == ["v1", "v1#2", "v2"]
    assert pairs[0].prompt == "what moves?" and pairs[0].chosen_media == ["v1.mp4"] == pairs[0].rejected_media
    assert pairs[0].meta == {"source": "llava_hound", "video": "v1", "chosen_score": 5, "rejected_score": 2,
                             "answer": "a red square moving", "video_tokens_removed": 1}
    assert pairs[2].chosen_media == [f"v2/c{i:02d}.jpg" for i in range(5)]
    as_list, _ = read_llava_hound(src.with_suffix(".json"), video_root=videos)
    assert [p.to_dict() for p in as_list] == [p.to_dict() for p in pairs]


def test_llava_hound_converts_to_our_folder_and_collates(hound, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import AutoProcessor

    from mmalign.tiny import cached_tiny

    src, videos = hound
    n, _ = from_llava_hound(src, tmp_path / "ours", video_root=videos)
    assert n == 3
    ours = load_video_pairs(tmp_path / "ours")
    direct = load_video_pairs(src, data_format="llava_hound", video_root=videos)
    assert all(m.startswith("media/") for p in ours for m in p.chosen_media)
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in ours] == [(p.id, p.prompt, p.chosen, p.rejected) for p in direct]
    adapter = VideoLLMAdapter(AutoProcessor.from_pretrained(cached_tiny("qwen2_5_vl")), sampling=FrameSampling(num_frames=4))
    for dataset in (ours, direct):
        batch = adapter.collate(list(dataset))
        assert batch["input_ids"].shape[0] == 6 and len(batch["video_inputs"]) == 2  # v1 shared by two pairs
    with pytest.raises(FileExistsError):
        from_llava_hound(src, tmp_path / "ours", video_root=videos)


def test_our_pairs_with_video_media_round_trip(tmp_path: Path) -> None:
    with PairWriter(tmp_path) as writer:
        clip = writer.add_media(write_video(tmp_path / "src.mp4", moving_square_clip(4, size=(16, 16))), "media/a.mp4", verify=False)
        writer.write(PreferencePair("a", "what moves?", "a square", "nothing", [clip], [clip], meta={"sampling": {"rejected": {"num_frames": 1}}}))
    (pair,) = read_pairs(tmp_path)
    assert pair.chosen_media == ["media/a.mp4"] and pair.meta["sampling"]["rejected"] == {"num_frames": 1}
    assert len(load_video_pairs(tmp_path)) == 1


def test_bad_records_name_line_and_field(hound, tmp_path: Path) -> None:  # noqa: ANN001
    _, videos = hound
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "video": "missing"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "video": "v1"}) + "\n")
    with pytest.raises(PairFormatError, match="record 1.*video"):
        read_llava_hound(bad, video_root=videos)
    pairs, skipped = read_llava_hound(bad, video_root=videos, skip_bad=True)
    assert pairs == [] and [(s.line, s.field) for s in skipped] == [(1, "video"), (2, "rejected")]


def test_training_reads_llava_hound_records_directly(hound, tmp_path: Path) -> None:  # noqa: ANN001
    from mmalign.engine import TrainConfig
    from video.train import VideoTrainConfig, run

    src, videos = hound
    config = VideoTrainConfig(
        model="tiny:qwen2_5_vl", data=str(src), data_format="llava_hound", video_root=str(videos), num_frames=4,
        train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, trackers=[], progress=False,
                          plot=False),
    )
    result = run(config)
    assert result.global_step == 1 and result.final_checkpoint is not None
    with pytest.raises(ValueError, match="video_root"):
        VideoTrainConfig(model="tiny:qwen2_5_vl", data=str(src), data_format="llava_hound")
