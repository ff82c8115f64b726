"""vision: preference optimisation of vision-language models (STIC, POVID, self-correction)."""

from __future__ import annotations

__all__: list[str] = []
