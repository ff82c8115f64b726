"""Text-to-image preference training (the same job as ``mmalign train-diffusion``); see ``--help``.

    python scripts/train_diffusion.py --config scripts/configs/sd15_diffusion_dpo.yaml --data my_pairs
    accelerate launch scripts/train_diffusion.py --config scripts/configs/sdxl_mapo.yaml
    python scripts/train_diffusion.py --config scripts/configs/sd21_dcpo.yaml --tiny true --data toy:brightness
"""

from __future__ import annotations

import sys

from diffusion.cli import train_diffusion as main
from mmalign.logs import quiet_libraries

if __name__ == "__main__":
    quiet_libraries()  # library warnings and loading bars off unless MMALIGN_VERBOSE=1
    sys.exit(main(sys.argv[1:]))
