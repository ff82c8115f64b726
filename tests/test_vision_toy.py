"""Coloured-square images of vision.toy (the VLM benchmark's data)."""

from __future__ import annotations

import numpy as np

from vision.toy import COLOURS, describe_square, square_image, square_images


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


def test_square_image_sides() -> None:
    """``sides=(5, 5)`` gives exactly 25 square pixels."""
    img = np.asarray(square_image("red", "blue", np.random.default_rng(0), sides=(5, 5)), dtype=int)
    assert (np.abs(img - np.array(COLOURS["red"])).max(-1) <= 15).sum() == 25
