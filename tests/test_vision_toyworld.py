"""The toy VLM of vision.toyworld: its builder, the shipped model, the POVID text rule and a demo end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign import toyworld as W
from mmalign.prompts import hallucination_injection_prompt
from vision.toyworld import (
    MODEL_DIR,
    build_toy_vlm,
    demo_stic,
    eval_scenes,
    evaluate_vlm,
    load_toy_vlm,
    make_toy_tokenizer,
    toy_hallucination_rewrite,
)


def test_tokenizer_makes_world_words_single_tokens() -> None:
    tok = make_toy_tokenizer()
    assert tok.tokenize(" a red circle to the left of a blue square") == [
        "Ġa", "Ġred", "Ġcircle", "Ġto", "Ġthe", "Ġleft", "Ġof", "Ġa", "Ġblue", "Ġsquare"]
    assert tok.decode(tok(" two purple triangles")["input_ids"], skip_special_tokens=True) == " two purple triangles"


def test_builder_tiny_run_loads_and_answers(tmp_path) -> None:  # noqa: ANN001
    """A few SFT steps: the folder loads through from_pretrained and answers every question with text."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_toy_vlm(tmp_path / "vlm", seed=0, progress=False, steps=4, n_scenes=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm"]  # the work folder is gone
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert json.loads((path / "build.json").read_text())["steps"] == 4
    scenes = eval_scenes(1)
    result = evaluate_vlm(model, processor, scenes)
    assert len(result["descriptions"]) == 3 and all(isinstance(d, str) for d in result["descriptions"])
    assert result["answer"].shape == (sum(len(s.questions()) for s in scenes),)
    assert set(np.unique(result["answer"])) <= {0.0, 1.0}


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="the shipped toy VLM is not there")
def test_shipped_model_reads_train_images_and_errs_on_held_out() -> None:
    """Train-split images: answers right more often than not, some descriptions exact. Held-out: answers
    right well above chance but not always, and some descriptions hallucinate."""
    model, processor = load_toy_vlm()
    held = evaluate_vlm(model, processor, eval_scenes(10))
    train = evaluate_vlm(model, processor, [s for k in W.KINDS for s in W.scenes(10, "train", k, seed=99)])
    assert train["answer"].mean() > 0.55
    assert train["description"].mean() > 0.2
    assert 0.3 < held["answer"].mean() < 0.95
    assert train["answer"].mean() > held["answer"].mean()
    assert held["hallucination"].mean() > 0


def test_toy_hallucination_rewrite_swaps_one_world_word() -> None:
    prompts = [hallucination_injection_prompt("a red circle to the left of a blue square", "Describe the image."),
               hallucination_injection_prompt("two", "how many squares are there?")]
    out = toy_hallucination_rewrite(None, None, prompts, seeds=[1, 2])
    assert out == toy_hallucination_rewrite(None, None, prompts, seeds=[1, 2])  # seeded
    changed = [(a, b) for a, b in zip(out[0].split(), "a red circle to the left of a blue square".split(),
                                      strict=True) if a != b]
    assert len(changed) == 1
    assert out[1] in ("one", "three")
    with pytest.raises(ValueError, match="not a hallucination-injection prompt"):
        toy_hallucination_rewrite(None, None, ["rewrite this"])


def test_demo_stic_end_to_end_tiny(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """STIC's three stages, two optimizer steps each, on a few images: the stage-2 rows, then the whole
    recipe's; the sheet, both stages' curves, rows.json; stage 3's set is every pool question with its true
    answer after the description the *stage-2* model gave of its image. Then the control: the base model
    on that very set, and the whole recipe paired against it."""
    from safetensors.torch import load_file

    import vision.toyworld as T
    from mmalign.pairs import read_pairs
    from mmalign.prompts import description_infused
    from mmalign.report import load_rows

    seen: dict[str, dict] = {}
    describe = T._stic_descriptions

    def spy(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return describe(model, *args, **kwargs)

    monkeypatch.setattr(T, "_stic_descriptions", spy)
    rows = demo_stic(tmp_path, seed=0, progress=False, steps=2, n_pool=2, n_eval=1)
    metrics_ = ["answer accuracy", "description accuracy", "hallucination rate"]
    assert [(r.method, r.metric) for r in rows] == [("STIC stage 2", m) for m in metrics_] + [("STIC", m) for m in metrics_]
    assert rows[0].n == sum(len(s.questions()) for s in eval_scenes(1)) and rows[1].n == 3
    assert "lower is better" in rows[2].note and "lower is better" in rows[5].note
    assert [r.before for r in rows[:3]] == [r.before for r in rows[3:]]
    for r in rows:
        assert 0 <= r.before <= 1 and 0 <= r.after <= 1 and r.lo <= r.after - r.before + 1e-9 <= r.hi + 2e-9
    folder = tmp_path / "stic"
    assert load_rows(folder / "rows.json") == rows
    assert (folder / "before_after.png").is_file()
    for train in ("train", "train_sft"):
        metrics = [json.loads(line) for line in (folder / train / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]

    # stage 3's descriptions come from the model after stage 2 (its checkpoint), not from the base model
    stage2 = load_file(folder / "train" / "checkpoints" / "step-00000002" / "model.safetensors")
    base = load_toy_vlm()[0].state_dict()
    assert all(torch.equal(seen["weights"][k], stage2[k]) for k in stage2)
    assert any(not torch.equal(seen["weights"][k], base[k]) for k in base)
    details = json.loads((folder / "details.json").read_text())
    descriptions = details["stage3_descriptions"]
    pool = T._pool(2, 0)
    assert sorted(descriptions) == [f"p{i:04d}.png" for i in range(len(pool))]
    infused = read_pairs(folder / "sft")
    assert details["stats"]["sft_records"] == len(infused) == sum(len(s.questions()) for s in pool)
    expected = [(f"p{i:04d}.png", q, a) for i, s in enumerate(pool) for q, a in s.questions()]
    for pair, (image, question, answer) in zip(infused, expected, strict=True):
        assert pair.chosen_media == [image] and pair.chosen == answer
        assert pair.prompt == description_infused(descriptions[image], question)
        assert (folder / "sft" / image).read_bytes() == (folder / "images" / image).read_bytes()

    control = T.control_stic_sft_only(tmp_path, seed=0, progress=False, steps=2, n_eval=1)
    assert [(r.method, r.metric) for r in control] == (
        [("STIC stage 3 alone", m) for m in metrics_] + [("STIC vs stage 3 alone", m) for m in metrics_])
    assert [r.before for r in control[:3]] == [r.before for r in rows[:3]]
    assert [r.before for r in control[3:]] == [r.after for r in control[:3]]
    assert [r.after for r in control[3:]] == [r.after for r in rows[3:]]
    metrics = [json.loads(line) for line in (tmp_path / "stic_sft_only" / "train_sft" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
