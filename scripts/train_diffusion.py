"""Text-to-image preference training: Diffusion-DPO, MaPO, DCPO, PSO (SD1.5/2.1, SDXL, SD3).

    python scripts/train_diffusion.py --config scripts/configs/sd15_diffusion_dpo.yaml --data my_pairs
    accelerate launch scripts/train_diffusion.py --config scripts/configs/sdxl_mapo.yaml
    python scripts/train_diffusion.py --config scripts/configs/sd21_dcpo.yaml --tiny true --data d --train.max_steps 2

Every field of ``diffusion.train.DiffusionTrainConfig`` is a flag and a YAML key (nested engine
settings as ``--train.<field>``); ``--tiny true`` swaps in the config's tiny pipeline (mmalign.tiny).
"""

from __future__ import annotations

import json
import logging
import sys

from diffusion.train import DiffusionTrainConfig, run
from mmalign.config import load_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(DiffusionTrainConfig, argv, description=__doc__)
    result = run(config)
    final = result.metrics[-1] if result.metrics else {}
    print(json.dumps({
        "output_dir": str(result.output_dir),
        "lora": str(result.lora_dir) if result.lora_dir else None,
        "pipeline": str(result.pipeline_dir) if result.pipeline_dir else None,
        "grid": str(result.grid_path) if result.grid_path else None,
        "ties_dropped": result.ties_dropped,
        "attention": result.attention,
        "final": {k: final[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in final},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
