"""Build or convert pair datasets (the same job as ``mmalign make-pairs``); ``--help`` lists the kinds.

    python scripts/make_pairs.py stic --model llava-hf/llava-1.5-7b-hf --stic.image_dir imgs --stic.out_dir pairs
    python scripts/make_pairs.py trl --src data.jsonl --out pairs [--image_root DIR]
    accelerate launch scripts/make_pairs.py stic ...      (one shard per process, merged at the end)
"""

from __future__ import annotations

import sys

from mmalign.cli import make_pairs
from mmalign.logs import quiet_libraries

if __name__ == "__main__":
    quiet_libraries()  # library warnings and loading bars off unless MMALIGN_VERBOSE=1
    argv = sys.argv[1:]
    if argv[:1] == ["vision"]:  # the older spelling: make_pairs.py vision stic ...
        argv = argv[1:]
    sys.exit(make_pairs(argv))
