"""vision: preference optimisation of vision-language models (STIC, POVID, self-correction).

Modules: :mod:`vision.adapter` (``VLMAdapter``: LoRA on the language model by default, online
negatives), :mod:`vision.generate` (batched generation, seeded per record), :mod:`vision.stic`,
:mod:`vision.povid` (pair builder and command; POVID's two-stage recipe), :mod:`vision.scl`
(self-correction pairs and command), :mod:`vision.records` (their question-answer input files),
:mod:`vision.train` (config + ``run``). Names are imported lazily so ``import vision`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "GenerationSettings",
    "ImageQA",
    "POVIDPairsConfig",
    "POVIDRecipeConfig",
    "SCLPairsConfig",
    "STICConfig",
    "VLMAdapter",
    "VLMTrainConfig",
    "build_povid_pairs",
    "build_scl_pairs",
    "build_stic_pairs",
    "generate_responses",
    "online_negative",
    "povid_pairs_command",
    "record_seed",
    "render_prompt",
    "run",
    "run_povid_recipe",
    "scl_pairs_command",
    "stic_dpo_config",
    "train_stic_dpo",
]

_WHERE = {
    "GenerationSettings": "vision.generate",
    "generate_responses": "vision.generate",
    "record_seed": "vision.generate",
    "POVIDRecipeConfig": "vision.povid",
    "POVIDPairsConfig": "vision.povid",
    "build_povid_pairs": "vision.povid",
    "povid_pairs_command": "vision.povid",
    "run_povid_recipe": "vision.povid",
    "SCLPairsConfig": "vision.scl",
    "build_scl_pairs": "vision.scl",
    "scl_pairs_command": "vision.scl",
    "ImageQA": "vision.records",
    "STICConfig": "vision.stic",
    "build_stic_pairs": "vision.stic",
    "stic_dpo_config": "vision.stic",
    "train_stic_dpo": "vision.stic",
    "VLMAdapter": "vision.adapter",
    "render_prompt": "vision.adapter",
    "online_negative": "vision.adapter",
    "VLMTrainConfig": "vision.train",
    "run": "vision.train",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'vision' has no attribute {name!r}")
