"""PhysDPO pair generation with a tiny Qwen2.5-VL on test clips: the three hacks reach the generator, pairs
are scored on the clean video with the plain question, the hack is recorded in meta, and a resumed or
sharded run writes the same pairs as one uninterrupted process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmalign.pairs import read_pairs
from video.frames import write_video
from video.generate import generate_video_responses
from video.physdpo import PhysDPOConfig, build_physdpo_pairs, read_video_qa
from video.synthetic import moving_square_clip

pytest.importorskip("av")

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    rows = []
    for name, color in COLORS.items():
        write_video(root / "videos" / f"{name}.mp4", moving_square_clip(8, size=(32, 48), color=color), fps=8)
        rows.append({"id": name, "video": f"videos/{name}.mp4", "question": "what moves in the video",
                     "answer": f"a {name} square moves right", "title": f"the {name} square slides"})
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "qa.jsonl"


@pytest.fixture(scope="module")
def policy() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.tiny import cached_tiny

    path = cached_tiny("qwen2_5_vl")
    return AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True), AutoProcessor.from_pretrained(path)


def _config(qa: Path, out: Path, **kw) -> PhysDPOConfig:  # noqa: ANN003
    base = dict(records=str(qa), out_dir=str(out), num_frames=4, max_new_tokens=4, temperature=1.0,
                batch_size=2, progress=False)
    return PhysDPOConfig(**{**base, **kw})


def _texts(folder: Path) -> list[tuple]:
    """Everything of each pair except the shard-dependent media path."""
    return [(p.id, p.prompt, p.chosen, p.rejected, json.dumps(p.meta, sort_keys=True)) for p in read_pairs(folder)]


def test_hacks_generate_and_clean_video_scores(qa: Path, tmp_path: Path, policy) -> None:  # noqa: ANN001
    model, processor = policy
    seen: list[tuple[str, object]] = []

    def spy(model, processor, prompts, clips, seeds, settings, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.extend(zip(prompts, clips, strict=True))
        return generate_video_responses(model, processor, prompts, clips, seeds, settings, **kw)

    report = build_physdpo_pairs(model, processor, _config(qa, tmp_path / "out"), rank=0, world_size=1, generate_fn=spy)
    assert report.written == 9 and report.merged == 9 and report.counts == {"title": 3, "frames": 3, "resolution": 3}
    pairs = {p.id: p for p in read_pairs(tmp_path / "out")}
    records = {r.id: r for r in read_video_qa(qa)}
    for pid, pair in pairs.items():
        _, rid, hack = pid.split("/")
        meta = pair.meta["physdpo"]
        assert pair.chosen_media == pair.rejected_media and pair.chosen_media[0].endswith(".mp4")
        assert pair.prompt == records[rid].question and pair.chosen == records[rid].answer
        assert meta["hack"] == hack and meta["corruption"]["scored_on"] == "clean"
        assert meta["clean_frames"] == [0, 2, 5, 7]
        if hack == "title":
            source = meta["corruption"]["params"]["title_from"]
            assert source != rid and meta["corruption"]["params"]["title"] == records[source].title
            assert records[source].title in meta["generation_prompt"]
        elif hack == "frames":
            assert meta["corruption"]["params"]["keep"] == 1 and meta["generation_frames"] == [2]
        else:
            assert meta["corruption"]["params"]["factor"] == 16.0
    frames_per_prompt = sorted(clip.num_frames for _, clip in seen)
    assert frames_per_prompt == [1, 1, 1] + [4] * 6
    # the resolution hack blurred the frames it generated from (same shape, pixels changed)
    lowres = [clip for prompt, clip in seen if clip.num_frames == 4 and "title of this video" not in prompt]
    clean = [clip for prompt, clip in seen if "title of this video" in prompt]
    assert len(lowres) == 3 and all(c.frames.shape == clean[0].frames.shape for c in lowres)
    assert all((c.frames.float() - clean[0].frames.float()).abs().mean() > 1 for c in lowres)


def test_resume_and_shards_equal_one_run(qa: Path, tmp_path: Path, policy) -> None:  # noqa: ANN001
    model, processor = policy
    build_physdpo_pairs(model, processor, _config(qa, tmp_path / "one"), rank=0, world_size=1)
    reference = _texts(tmp_path / "one")

    calls = {"n": 0}

    def crash_on_third(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return generate_video_responses(*args, **kw)

    with pytest.raises(RuntimeError, match="killed"):
        build_physdpo_pairs(model, processor, _config(qa, tmp_path / "resumed"), rank=0, world_size=1,
                            generate_fn=crash_on_third)
    assert not (tmp_path / "resumed" / "pairs.jsonl").exists()
    report = build_physdpo_pairs(model, processor, _config(qa, tmp_path / "resumed", batch_size=3), rank=0, world_size=1)
    assert report.already_done == 4 and report.written == 5
    assert _texts(tmp_path / "resumed") == reference

    first = build_physdpo_pairs(model, processor, _config(qa, tmp_path / "sharded"), rank=1, world_size=2)
    assert first.merged is None and first.other_ranks == 6  # rank 0 has not finished: no merge yet
    last = build_physdpo_pairs(model, processor, _config(qa, tmp_path / "sharded"), rank=0, world_size=2)
    assert last.merged == 9
    assert _texts(tmp_path / "sharded") == reference


def test_config_and_records_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hacks"):
        PhysDPOConfig(hacks=["blur"])
    with pytest.raises(ValueError, match="short_clips"):
        PhysDPOConfig(short_clips="pad")
    with pytest.raises(ValueError, match="hack_frames"):
        PhysDPOConfig(num_frames=4, hack_frames=4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(ValueError, match="question"):
        read_video_qa(bad)


def test_generated_chosen_uses_the_true_title_on_the_clean_clip(qa: Path, tmp_path: Path) -> None:
    """With ``generate_chosen`` the preferred answer is the policy's, hinted with the video's own title (as the
    paper made its preferred answers); ``pairs_per_record="one"`` picks one seeded hack per record."""
    calls: list[tuple[list[str], list[int]]] = []

    def fake(model, processor, prompts, clips, seeds, settings, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append((list(prompts), [c.num_frames for c in clips]))
        return [f"answer {len(calls)}.{i}" for i in range(len(prompts))]

    config = _config(qa, tmp_path / "out", generate_chosen=True, pairs_per_record="one", batch_size=8)
    report = build_physdpo_pairs(None, None, config, rank=0, world_size=1, generate_fn=fake)
    assert report.written == 3 and sum(report.counts.values()) == 3
    (rejected_prompts, _), (chosen_prompts, chosen_frames) = calls
    records = read_video_qa(qa)
    assert chosen_prompts == [f'The title of this video is "{r.title}".\n{r.question}' for r in records]
    assert chosen_frames == [4, 4, 4]
    for pair in read_pairs(tmp_path / "out"):
        assert pair.chosen.startswith("answer 2.") and pair.meta["physdpo"]["chosen_generated"] is True
        assert pair.prompt == "what moves in the video"
