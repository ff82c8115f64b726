"""Build or convert video pair datasets; ``<kind> --help`` lists a kind's flags.

    python scripts/make_video_pairs.py physdpo --model M --physdpo.records qa.jsonl --physdpo.out_dir OUT
    python scripts/make_video_pairs.py physdpo --config scripts/configs/llava_onevision_physdpo_pairs.yaml
    python scripts/make_video_pairs.py llava-hound --src sft_dpo_17k.jsonl --video_root FRAMES --out OUT
    accelerate launch scripts/make_video_pairs.py physdpo ...      (one shard per process, merged at the end)
"""

from __future__ import annotations

import sys

from video.cli import llava_hound_pairs, physdpo_pairs

KINDS = {"physdpo": physdpo_pairs, "llava-hound": llava_hound_pairs}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in KINDS:
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return KINDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
