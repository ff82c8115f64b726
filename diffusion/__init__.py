"""diffusion: text-to-image alignment (Diffusion-DPO, MaPO, DCPO, PSO) and ReNO noise optimisation."""

from __future__ import annotations

from diffusion.adapter import DiffusionAdapter, detect_architecture, drop_ties
from diffusion.cache import LatentCache, build_cache
from diffusion.pso import OnlinePSO, few_step_scheduler, make_pso_pairs, sample_images
from diffusion.reno import ReNOResult, optimize_noise
from diffusion.train import DiffusionRunResult, DiffusionTrainConfig, load_pipeline, run, save_lora

__all__ = [
    "DiffusionAdapter",
    "DiffusionRunResult",
    "DiffusionTrainConfig",
    "LatentCache",
    "OnlinePSO",
    "ReNOResult",
    "build_cache",
    "detect_architecture",
    "drop_ties",
    "few_step_scheduler",
    "load_pipeline",
    "make_pso_pairs",
    "optimize_noise",
    "run",
    "sample_images",
    "save_lora",
]
