"""Small helpers shared by production code and the tiny-model builders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside a forked RNG, so the block is deterministic and the caller's random state is kept.

    The CPU generator is always forked; a CUDA ``device`` has its generator forked too (sampling on the GPU).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
