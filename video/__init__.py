"""video: preference optimisation of video LLMs, with PhysDPO-style self-made negatives.

Modules: :mod:`video.frames` (PyAV decoding, frame sampling, frame cache), :mod:`video.adapter`
(``VideoLLMAdapter`` for LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2.5-VL), :mod:`video.generate` (batched,
per-record seeded answers), :mod:`video.physdpo` (misleading-title / fewer-frames / lower-resolution
negatives), :mod:`video.formats` (our pair folders, LLaVA-Hound-DPO records), :mod:`video.train` (config +
``run``), :mod:`video.cli` (the ``train-video``, ``physdpo`` and ``llava-hound`` jobs), :mod:`video.synthetic`
(test clips). Names are imported lazily so ``import video`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Clip",
    "FrameCache",
    "FrameSampling",
    "PhysDPOConfig",
    "VideoLLMAdapter",
    "VideoTrainConfig",
    "build_physdpo_pairs",
    "check_videos",
    "from_llava_hound",
    "generate_video_responses",
    "load_clip",
    "load_video_pairs",
    "read_llava_hound",
    "run",
]

_WHERE = {
    "Clip": "video.frames",
    "FrameCache": "video.frames",
    "FrameSampling": "video.frames",
    "load_clip": "video.frames",
    "check_videos": "video.frames",
    "VideoLLMAdapter": "video.adapter",
    "generate_video_responses": "video.generate",
    "PhysDPOConfig": "video.physdpo",
    "build_physdpo_pairs": "video.physdpo",
    "from_llava_hound": "video.formats",
    "load_video_pairs": "video.formats",
    "read_llava_hound": "video.formats",
    "VideoTrainConfig": "video.train",
    "run": "video.train",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'video' has no attribute {name!r}")
