"""Preference-optimise a vision-language model (the same job as ``mmalign train-vlm``); see ``--help``.

    python scripts/train_vlm.py --config scripts/configs/llava15_stic.yaml --data data/stic_pairs
    accelerate launch scripts/train_vlm.py --config ...
"""

from __future__ import annotations

import sys

from mmalign.logs import quiet_libraries
from vision.cli import train_vlm as main

if __name__ == "__main__":
    quiet_libraries()  # library warnings and loading bars off unless MMALIGN_VERBOSE=1
    sys.exit(main(sys.argv[1:]))
