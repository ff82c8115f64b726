"""Preference-optimise a video LLM: ``python scripts/train_video.py --config c.yaml [--flag v ...]``.

Multi-GPU / multi-node: ``accelerate launch scripts/train_video.py --config ...``. PhysDPO's recipe:
``scripts/configs/llava_onevision_physdpo.yaml`` (and the LLaVA-NeXT-Video / Qwen2.5-VL twins).
"""

from __future__ import annotations

import json
import sys

from mmalign.config import load_config
from video.train import VideoTrainConfig, run


def main(argv: list[str] | None = None) -> None:
    config = load_config(VideoTrainConfig, argv, description=__doc__)
    result = run(config)
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"steps": result.global_step, "output_dir": str(result.output_dir),
                      "checkpoint": str(result.final_checkpoint), "last_metrics": last}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
