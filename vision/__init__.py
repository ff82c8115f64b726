"""vision: preference optimisation of vision-language models (STIC, POVID, self-correction).

Modules: :mod:`vision.adapter` (``VLMAdapter``), :mod:`vision.generate` (batched generation),
:mod:`vision.stic`, :mod:`vision.povid`, :mod:`vision.scl` (pair builders), :mod:`vision.train`
(config + ``run``). Names are imported lazily so ``import vision`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GenerationSettings",
    "POVIDRecord",
    "SCLRecord",
    "STICConfig",
    "VLMAdapter",
    "VLMTrainConfig",
    "build_povid_pairs",
    "build_scl_pairs",
    "build_stic_pairs",
    "generate_responses",
    "render_prompt",
    "run",
]

_WHERE = {
    "GenerationSettings": "vision.generate",
    "generate_responses": "vision.generate",
    "POVIDRecord": "vision.povid",
    "build_povid_pairs": "vision.povid",
    "SCLRecord": "vision.scl",
    "build_scl_pairs": "vision.scl",
    "STICConfig": "vision.stic",
    "build_stic_pairs": "vision.stic",
    "VLMAdapter": "vision.adapter",
    "render_prompt": "vision.adapter",
    "VLMTrainConfig": "vision.train",
    "run": "vision.train",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vision' has no attribute {name!r}")
