"""The toy CLIP: built at a tiny step count it saves and loads through open_clip's folder path; the
shipped one ranks the right caption first on held-out renders far above chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from mmalign import toyworld as tw  # noqa: E402
from mmalign.rewards import ClipScore, load_open_clip  # noqa: E402
from mmalign.toyclip import (  # noqa: E402
    DEFAULT_TOY_CLIP_DIR,
    build_toy_clip,
    hard_negative,
    load_toy_clip,
    retrieval_accuracy,
)


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_build_saves_open_clip_folder_that_loads(tmp_path):
    out = build_toy_clip(tmp_path / "clip", steps=2, batch_size=8, progress=False)
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    info = json.loads((out / "toy_clip.json").read_text())
    assert info["steps"] == 2 and "held_out/pair" in info["retrieval"]
    model, tokenizer, cfg = load_open_clip(pretrained=out)
    assert cfg["size"] in (32, (32, 32))
    reward = ClipScore(pretrained=str(out))
    images = _pixels([tw.render(s) for s in tw.scenes(3, "held_out", "single")])
    score = reward(images, ["a red triangle"] * 3)
    assert score.shape == (3,) and torch.isfinite(score).all()
    assert not any(p.requires_grad for p in model.parameters())


def test_build_replaces_folder_only_when_complete(tmp_path):
    out = tmp_path / "clip"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_toy_clip(out, steps=1, batch_size=4, progress=False)
    assert not (out / "stale.txt").exists()
    assert not list(tmp_path.glob(".clip.*"))


def test_hard_negative_changes_one_fact_and_respects_allowed():
    gen = np.random.default_rng(0)
    spec = tw.parse_caption("two red circles")
    for _ in range(20):
        neg = tw.parse_caption(hard_negative(spec, gen))
        differs = (neg.items != spec.items) + (neg.count != spec.count)
        assert differs == 1
    allowed = {"three red circles"}
    assert hard_negative(spec, gen, allowed) == "three red circles"
    assert hard_negative(spec, gen, set()) is None


def test_shipped_clip_retrieves_held_out_captions_above_chance():
    if not (DEFAULT_TOY_CLIP_DIR / "open_clip_model.safetensors").is_file():
        pytest.skip("toy_models/clip is not built")
    reward = load_toy_clip()
    model, tokenizer = reward.encoder.model, reward.encoder.tokenizer
    gen = np.random.default_rng(123)
    for kind, floor in (("single", 0.6), ("count", 0.35)):
        specs = tw.prompts("held_out", kind) * 2
        images = [tw.render(tw.sample_scene(gen, spec=s)) for s in specs]
        acc = retrieval_accuracy(model, tokenizer, images, specs, tw.prompts("held_out", kind))
        chance = 1 / len(tw.prompts("held_out", kind))
        assert acc.mean() >= floor > 3 * chance, (kind, acc.mean())
    # as a reward: the right caption outscores the same shape in another colour on most images
    specs = tw.prompts("held_out", "single")
    images = _pixels([tw.render(tw.sample_scene(gen, spec=s)) for s in specs])
    right = reward(images, [s.caption() for s in specs])
    wrong = reward(images, [f"a {'blue' if s.items[0][0] != 'blue' else 'red'} {s.items[0][1]}" for s in specs])
    assert (right > wrong).float().mean() >= 0.8


def test_retrieval_accuracy_needs_the_caption_among_candidates():
    with pytest.raises(ValueError, match="not among the candidates"):
        retrieval_accuracy(None, None, [np.zeros((32, 32, 3), np.uint8)], ["a red circle"], ["a blue square"])
