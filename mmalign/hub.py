"""Model names: a hub name or local folder passes through; ``tiny:<name>`` is a tiny built model.

Every command that takes a model (VLM and video training, pair generation, diffusion training,
ReNO) resolves its name here, so ``tiny:llava`` or ``tiny:sd`` works wherever a real checkpoint
name does. Tiny models (:mod:`mmalign.tiny`) are randomly initialised, built from their configs
once per machine and saved in the same format ``from_pretrained`` reads: they exercise the real
loading path with no download, for tests, smoke runs and the demo.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["TINY_PREFIX", "is_tiny", "resolve_pretrained"]

TINY_PREFIX = "tiny:"


def is_tiny(name_or_path: str | os.PathLike[str]) -> bool:
    return str(name_or_path).startswith(TINY_PREFIX)


def resolve_pretrained(name_or_path: str | os.PathLike[str], **tiny_kwargs: Any) -> str:
    """The folder or hub name to hand to ``from_pretrained``.

    ``tiny:<name>`` builds (once, cached) the tiny model ``<name>`` of :data:`mmalign.tiny.TINY_BUILDERS`
    with ``tiny_kwargs`` and returns its folder; any other value is returned unchanged, and
    ``tiny_kwargs`` are then an error (they would be silently ignored).
    """
    text = str(name_or_path)
    if is_tiny(text):
        from mmalign.tiny import TINY_BUILDERS, cached_tiny  # only tiny: names reach the builders

        name = text[len(TINY_PREFIX):]
        if name not in TINY_BUILDERS:
            raise ValueError(f"unknown tiny model {text!r}; known: "
                             f"{', '.join(TINY_PREFIX + k for k in sorted(TINY_BUILDERS))}")
        return str(cached_tiny(name, **tiny_kwargs))
    if tiny_kwargs:
        raise ValueError(f"tiny_kwargs {sorted(tiny_kwargs)} only apply to tiny:<name> models, not {text!r}")
    return text
