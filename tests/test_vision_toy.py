"""Toy STIC evidence (vision.toy): data, a smoke run of the whole pipeline, and its invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vision.toy import COLOURS, ToyConfig, describe_square, run_stic_toy, square_image, square_images


def test_square_image_pixels_and_description() -> None:
    """The corners are background unless covered; the square's pixels are its colour (+-15 per channel)."""
    img = np.asarray(square_image("red", "blue", np.random.default_rng(0)), dtype=int)
    assert img.shape == (32, 32, 3)
    red = np.abs(img - np.array(COLOURS["red"])).max(-1) <= 15
    blue = np.abs(img - np.array(COLOURS["blue"])).max(-1) <= 15
    assert (red | blue).all()
    side = int(np.sqrt(red.sum()))
    assert side * side == red.sum() and 32 // 3 <= side <= 32 // 2  # one solid square
    assert describe_square("red", "blue") == "a red square on a blue background"


def test_square_images_cycle_all_combinations() -> None:
    items = square_images(30, seed=1)
    assert len({(s, b) for _, s, b in items}) == 30  # 6 colours x 5 other backgrounds
    assert all(s != b for _, s, b in items)


def test_toy_config_validates() -> None:
    with pytest.raises(ValueError, match="n_sft"):
        ToyConfig(n_sft=0)
    with pytest.raises(ValueError, match="sft_long_prompt_fraction"):
        ToyConfig(sft_long_prompt_fraction=1.5)
    with pytest.raises(ValueError, match="ches_drop_fraction"):
        ToyConfig(ches_drop_fraction=1.0)
    with pytest.raises(ValueError, match="lowres_size"):
        ToyConfig(lowres_size=32)
    with pytest.raises(ValueError, match="square_min"):
        ToyConfig(square_min=9, square_max=8)


def test_square_image_sides() -> None:
    """``sides=(5, 5)`` gives exactly 25 square pixels."""
    img = np.asarray(square_image("red", "blue", np.random.default_rng(0), sides=(5, 5)), dtype=int)
    assert (np.abs(img - np.array(COLOURS["red"])).max(-1) <= 15).sum() == 25


def test_stic_toy_smoke(tmp_path) -> None:  # noqa: ANN001
    """The whole pipeline on a few images and steps; the numbers hang together.

    The implicit reward margin of DPO with the SFT model as reference is
    ``beta * mean((pc - rc) - (pr - rr)) = beta * (after pair margin - before pair margin)``.
    """
    config = ToyConfig(out_dir=str(tmp_path / "toy"), n_sft=8, n_stic=8, n_heldout=3, sft_steps=3, dpo_steps=2,
                       batch_size=4, max_new_tokens=6, sft_long_prompt_fraction=0.5, ches_drop_fraction=0.5)
    results = run_stic_toy(config)
    assert json.loads((tmp_path / "toy" / "results.json").read_text()) == json.loads(json.dumps(results))
    stage1 = results["stage1"]
    assert stage1["pairs"] + sum(stage1["skipped"].values()) == 8
    assert sum(stage1["branches"].values()) == stage1["pairs"]
    ches = results["ches_filter"]  # floor(0.5 * pairs) dropped by CHES, the rest trained on
    assert ches["dropped"] == stage1["pairs"] // 2 and ches["kept"] + ches["dropped"] == stage1["pairs"]
    assert len((tmp_path / "toy" / "stic_pairs_ches" / "pairs.jsonl").read_text().splitlines()) == ches["kept"]
    held = results["heldout"]
    before, after = held["before"], held["after"]
    assert before["pair"]["n"] == after["pair"]["n"] == 2 * 3  # two corruptions per held-out image
    assert before["text"]["n"] == after["text"]["n"] <= 6
    assert after["pair"]["margin"] != before["pair"]["margin"]  # DPO changed the model
    expected = 0.1 * (after["pair"]["margin"] - before["pair"]["margin"])
    assert math.isclose(held["implicit_reward_margin"], expected, rel_tol=1e-3, abs_tol=1e-5)
    assert (tmp_path / "toy" / "describer" / "model.safetensors").is_file()

    # the STIC part again from the saved describer: same before-numbers, no SFT
    again = run_stic_toy(ToyConfig(**{**config.__dict__, "out_dir": str(tmp_path / "toy2")}),
                         describer=tmp_path / "toy" / "describer")
    assert "sft" not in again["seconds"]
    assert again["heldout"]["before"]["pair"] == pytest.approx(before["pair"], abs=1e-4)
