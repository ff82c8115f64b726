"""Preference-optimise a video LLM; see ``--help``.

    python scripts/train_video.py --config scripts/configs/llava_onevision_physdpo.yaml --data data/physdpo_pairs
    accelerate launch scripts/train_video.py --config ...
"""

from __future__ import annotations

import sys

from video.cli import train_video as main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
