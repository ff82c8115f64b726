"""ReNO from the command line (the same job as ``mmalign reno``); see ``--help``.

    python scripts/reno.py --pipeline /models/sd-turbo --reward hpsv2=/models/HPS_v2.1_compressed.pt:5 \\
        --reward clip=/models/CLIP-ViT-H-14:0.01 --out runs/reno "a red fox in the snow"
    accelerate launch scripts/reno.py --pipeline tiny:sd --reward redness:1 --prompts_file p.txt --out runs/toy
"""

from __future__ import annotations

import sys

from diffusion.cli import reno as main
from mmalign.logs import quiet_libraries

if __name__ == "__main__":
    quiet_libraries()  # library warnings and loading bars off unless MMALIGN_VERBOSE=1
    sys.exit(main(sys.argv[1:]))
