"""Synthetic clips for tests and demos: a pan-and-zoom over a still photo, a moving square.

:func:`pan_zoom_clip` turns a photo (e.g. ``skimage.data.astronaut()``) into a short "camera move": a
crop window slides from one side of the photo to the other while zooming in, each crop resized to the
output size. It gives a real-looking clip (natural textures, smooth motion) without any download.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["moving_square_clip", "pan_zoom_clip"]


def pan_zoom_clip(
    image: np.ndarray,
    num_frames: int = 24,
    *,
    size: tuple[int, int] = (64, 64),
    zoom: tuple[float, float] = (1.0, 1.6),
) -> np.ndarray:
    """A pan from left to right with a zoom from ``zoom[0]`` to ``zoom[1]`` over ``image``.

    Args:
        image: ``(H, W, 3)`` uint8 photo (grayscale ``(H, W)`` is repeated to RGB).
        size: output ``(height, width)``.
        zoom: magnification at the first and last frame (1 = the largest crop of the output's aspect).

    Returns:
        ``uint8 (num_frames, height, width, 3)``.
    """
    if num_frames < 1:
        raise ValueError(f"pan_zoom_clip: num_frames must be >= 1, got {num_frames}")
    photo = np.asarray(image)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
        raise ValueError(f"pan_zoom_clip: expected a uint8 RGB image, got {photo.dtype} {photo.shape}")
    pil = Image.fromarray(photo)
    h, w = photo.shape[:2]
    out_h, out_w = size
    base = min(h / out_h, w / out_w)  # crop scale that fits the output aspect inside the photo
    frames = []
    for k in range(num_frames):
        t = k / max(1, num_frames - 1)
        scale = base / (zoom[0] + (zoom[1] - zoom[0]) * t)
        crop_h, crop_w = out_h * scale, out_w * scale
        left = (w - crop_w) * t
        top = (h - crop_h) * 0.5 * (1 - t)
        box = (left, top, left + crop_w, top + crop_h)
        frames.append(np.asarray(pil.resize((out_w, out_h), Image.BILINEAR, box=box)))
    return np.stack(frames)


def moving_square_clip(
    num_frames: int = 16,
    *,
    size: tuple[int, int] = (32, 32),
    square: int = 8,
    color: tuple[int, int, int] = (255, 0, 0),
    background: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """A square of ``color`` moving left to right across ``background``: ``uint8 (T, H, W, 3)``.

    Frame ``k`` has the square's left edge at ``round(k * (W - square) / (T - 1))``, so every frame differs.
    """
    h, w = size
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    frames[:] = np.asarray(background, dtype=np.uint8)
    top = (h - square) // 2
    for k in range(num_frames):
        left = round(k * (w - square) / max(1, num_frames - 1))
        frames[k, top : top + square, left : left + square] = np.asarray(color, dtype=np.uint8)
    return frames
