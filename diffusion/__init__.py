"""diffusion: text-to-image alignment (Diffusion-DPO, MaPO, DCPO, PSO) and ReNO noise optimisation."""

from __future__ import annotations

__all__: list[str] = []
