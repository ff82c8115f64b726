"""Small helpers shared by production code and the tiny-model builders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["byte_alphabet", "seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside a forked RNG, so the block is deterministic and the caller's random state is kept.

    The CPU generator is always forked; a CUDA ``device`` has its generator forked too (sampling on the GPU).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]
