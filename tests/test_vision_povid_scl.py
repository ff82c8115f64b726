"""POVID and SCL pair builders on tiny models (a tiny causal LM rewrites answers for POVID)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.pairs import read_pairs
from vision.generate import GenerationSettings
from vision.povid import POVIDRecord, build_povid_pairs
from vision.scl import SCLRecord, build_scl_pairs


@pytest.fixture(scope="module")
def llava() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.tiny import cached_tiny

    path = cached_tiny("llava")
    return AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval(), AutoProcessor.from_pretrained(path)


def _img(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype("uint8"))


def test_povid_two_sets_with_weights(llava, tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.tiny import cached_tiny

    model, processor = llava
    lm_path = cached_tiny("causal_lm")
    rewriter = AutoModelForCausalLM.from_pretrained(lm_path, use_safetensors=True)
    records = [POVIDRecord(f"r{i}", _img(i), "what is in the image", "a red cube on a table") for i in range(2)]
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0)
    report = build_povid_pairs(model, processor, records, tmp_path, rewriter=rewriter,
                               rewriter_tokenizer=AutoTokenizer.from_pretrained(lm_path), settings=settings)
    pairs = {p.id: p for p in read_pairs(tmp_path)}
    assert report.written == {"text": 2, "image": 2} and len(pairs) == 4
    # weight 2 * 0.5 per pair: the engine's mean over both sets is 0.5 * mean_text + 0.5 * mean_image
    assert {p.meta["weight"] for p in pairs.values()} == {1.0}
    image_pair = pairs["r0/image"]
    noisy = np.asarray(Image.open(tmp_path / image_pair.meta["povid"]["noisy_image"])).astype(float)
    clean = np.asarray(Image.open(tmp_path / image_pair.chosen_media[0])).astype(float)
    assert np.abs(noisy - clean).mean() > 10  # t=500 noise: std ~0.25 of the range before clamping
    assert image_pair.meta["povid"]["corruption"]["params"]["t"] == 500
    assert image_pair.rejected_media == image_pair.chosen_media  # scored on the clean image by default
    with pytest.raises(ValueError, match="weights"):
        build_povid_pairs(model, processor, records, tmp_path / "x", text_weight=0, image_weight=0)


def test_scl_keeps_only_flips(llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = llava
    records = [SCLRecord(f"s{i}", _img(i), "is there a cube", reference=i) for i in range(4)]
    calls = {"n": 0}

    def fake_generate(policy, proc, convs, images, settings):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:  # second turn: conversations carry the first answer and a review prompt
            assert all(len(c) == 3 and c[1]["role"] == "assistant" for c in convs)
            return ["yes", "no", "yes", "no"]
        return ["no", "yes", "yes", "no"]

    report = build_scl_pairs(model, processor, records, lambda rec, ans: ans == "yes", tmp_path,
                             generate_fn=fake_generate)
    assert report.counts == {"improved": 1, "worsened": 1, "both": 1, "neither": 1}
    pairs = {p.id: p for p in read_pairs(tmp_path)}
    assert set(pairs) == {"scl/s0", "scl/s1"}
    assert pairs["scl/s0"].chosen == "yes" and pairs["scl/s0"].meta["scl"]["kind"] == "improved"
    assert pairs["scl/s1"].chosen == "yes" and pairs["scl/s1"].rejected == "no"


def test_scl_real_generation_runs(llava, tmp_path) -> None:  # noqa: ANN001
    """The two-turn chat renders through the tiny LLaVA template and generates."""
    model, processor = llava
    records = [SCLRecord("a", _img(0), "is there a cube")]
    report = build_scl_pairs(model, processor, records, lambda rec, ans: len(ans) % 2 == 0, tmp_path,
                             settings=GenerationSettings(max_new_tokens=3, temperature=1.0))
    assert sum(report.counts.values()) == 1
