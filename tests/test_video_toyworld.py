"""The toy video LLM (motion clips, SFT on clips tensorised once) and the PhysDPO demo on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from video import toyworld as tw


def test_answers_and_checker() -> None:
    facts = {"colour": "red", "direction": "left", "rule": "teleport"}
    assert [tw.clip_answer(k, facts) for k in tw.QUESTIONS] == ["no", "left", "red"]
    assert tw.clip_title(facts) == "a red ball moves left and jumps"
    assert tw.answer_correct("colour", "The ball is RED.", facts)
    assert not tw.answer_correct("colour", "red or blue", facts)  # two candidates named: not an answer
    assert not tw.answer_correct("direction", "right", facts)
    assert not tw.answer_correct("smooth", "", facts)
    assert tw.answer_correct("smooth", "no", facts) and not tw.answer_correct("smooth", "yes", facts)
    with pytest.raises(ValueError, match="unknown question kind"):
        tw.clip_answer("size", facts)


def test_clips_seeded_balanced_and_disjoint() -> None:
    a = tw.toy_clips(6, "held_out", seed=3)
    b = tw.toy_clips(6, "held_out", seed=3)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b, strict=True))
    assert sorted(x.facts["rule"] for x in a) == ["constant"] * 3 + ["teleport"] * 3
    other = tw.toy_clips(6, "physdpo", seed=3)
    assert not any(np.array_equal(x.frames, y.frames) for x in a for y in other)
    assert a[0].frames.shape == (8, 32, 32, 3) and a[0].frames.dtype == np.uint8
    with pytest.raises(ValueError, match="split"):
        tw.toy_clips(2, "test")


def test_builder_saves_a_model_that_loads(tmp_path) -> None:
    config = tw.ToyVideoConfig(sft_clips=4, sft_steps=2, sft_batch=4, vision_hidden=32, text_hidden=32)
    folder = tw.build_toy_video_llm(tmp_path / "toy", seed=1, progress=False, config=config)
    assert (folder / "model.safetensors").is_file()
    build = json.loads((folder / "toy_build.json").read_text())
    assert build["sft_steps"] == 2 and np.isfinite(build["final_loss"])
    model, processor = tw.load_toy_video_llm(folder)
    assert type(model).__name__ == "LlavaNextVideoForConditionalGeneration"
    assert model.config.text_config.hidden_size == 32
    assert processor.video_token == "<video>"


@pytest.fixture(scope="module")
def shipped():
    if not (tw.SHIPPED / "config.json").is_file():
        pytest.skip("toy_models/video is not built")
    torch.set_num_threads(1)
    return tw.load_toy_video_llm()


def test_shipped_model_reads_the_clip_and_is_imperfect(shipped, tmp_path) -> None:
    model, processor = shipped
    items = tw.toy_clips(24, "held_out", seed=5)
    tw._write_clips(items, tmp_path)
    answers = tw._answers(model, processor, items)
    acc = {k: float(np.mean([tw.answer_correct(k, a, it.facts) for a, it in zip(answers[k], items, strict=True)]))
           for k in tw.QUESTIONS}
    assert acc["colour"] >= 0.5, acc  # it looks at the clip (chance: 1/6) ...
    assert len(set(answers["colour"])) >= 4, answers["colour"]  # ... answering from it, not from a prior ...
    assert float(np.mean(list(acc.values()))) <= 0.95, acc  # ... and leaves room for alignment


def test_demo_end_to_end(shipped, tmp_path) -> None:
    config = tw.DemoConfig(train_clips=4, eval_clips=4, num_epochs=1, batch_size=4, grid_clips=2)
    rows = tw.demo_physdpo(tmp_path, seed=0, progress=False, config=config)
    metrics = [r.metric for r in rows]
    assert metrics[:4] == [f"held-out answer accuracy ({k})" for k in (*tw.QUESTIONS, "all")]
    assert all(r.lo <= r.hi and 0 <= r.before <= 1 for r in rows[:4])
    assert rows[3].n == 12
    out = tmp_path / "physdpo"
    saved = json.loads((out / "rows.json").read_text())
    assert [r["metric"] for r in saved["rows"]] == metrics and saved["dpo_steps"] >= 1
    assert (out / "before_after.png").is_file() and (out / "train" / "metrics.jsonl").is_file()
    assert (out / "pairs" / "pairs.jsonl").is_file()
