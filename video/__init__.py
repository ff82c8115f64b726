"""video: video-LLM preference optimisation with PhysDPO-style negatives (not yet implemented)."""

from __future__ import annotations

__all__: list[str] = []
