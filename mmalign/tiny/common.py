"""What every tiny-model family shares: the output folder, saving, CLIP's image normalisation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _prepare_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"tiny model output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_model(out: Path, model: Any, processor: Any) -> Path:
    """Save a tiny transformers model and its processor (or tokenizer) into ``out``; return ``out``."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


_CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
