"""Coloured-square images with exact descriptions (``benchmarks/vision.py``'s data).

32x32 images of a coloured square (random size and place, slightly varied shades) on a background of
another colour, described as ``"a {square} square on a {background} background"``. The toy-world
evidence for the VLM methods (a toy VLM that hallucinates; STIC, POVID and SCL run on it) is
:mod:`vision.toyworld`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

__all__ = ["COLOURS", "describe_square", "square_image", "square_images"]

#: Colour name -> RGB; names are single tokens of the tiny tokenizer.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 60, 210),
    "yellow": (225, 215, 40),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
}


def describe_square(square: str, background: str) -> str:
    """The true description, e.g. ``"a red square on a blue background"``."""
    return f"a {square} square on a {background} background"


def square_image(
    square: str, background: str, rng: np.random.Generator, size: int = 32, sides: tuple[int, int] | None = None
) -> Any:
    """A ``size`` x ``size`` RGB PIL image: a ``square``-coloured square on ``background``.

    The side is drawn uniformly from ``sides`` (inclusive; default ``(size // 3, size // 2)``).
    """
    from PIL import Image

    def shade(name: str) -> np.ndarray:
        return np.clip(np.array(COLOURS[name]) + rng.integers(-15, 16, 3), 0, 255)

    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = shade(background)
    low, high = sides or (size // 3, size // 2)
    if not 1 <= low <= high <= size:
        raise ValueError(f"square sides must satisfy 1 <= low <= high <= {size}, got {(low, high)}")
    side = int(rng.integers(low, high + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    pixels[top : top + side, left : left + side] = shade(square)
    return Image.fromarray(pixels)


def square_images(n: int, seed: int, sides: tuple[int, int] | None = None) -> list[tuple[Any, str, str]]:
    """``n`` images ``(PIL image, square colour, background colour)``, cycling through all 30 combinations."""
    rng = np.random.default_rng(seed)
    combos = [(s, b) for s in COLOURS for b in COLOURS if s != b]
    random.Random(seed).shuffle(combos)
    return [(square_image(*combos[i % len(combos)], rng, sides=sides), *combos[i % len(combos)]) for i in range(n)]
