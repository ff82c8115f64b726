"""Build or convert video pair datasets.

    python scripts/make_video_pairs.py physdpo --model M --physdpo.records qa.jsonl --physdpo.out_dir OUT [...]
    python scripts/make_video_pairs.py physdpo --config scripts/configs/llava_onevision_physdpo_pairs.yaml
    python scripts/make_video_pairs.py llava_hound --src sft_dpo_17k.jsonl --video_root FRAMES --out OUT

``physdpo`` generates dispreferred answers with the policy under PhysDPO's hacks (misleading title, fewer
frames, lower resolution); shard it with ``accelerate launch``, re-run to resume. ``llava_hound`` converts
LLaVA-Hound-DPO records into our pair folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from mmalign.config import help_, load_config
from video.physdpo import PhysDPOConfig


@dataclass
class PhysDPOJob:
    """PhysDPO pair generation from the command line."""

    model: str = field(default="", metadata=help_("policy folder, hub name or tiny:<name>"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    physdpo: PhysDPOConfig = field(default_factory=PhysDPOConfig, metadata=help_("generation settings"))


def physdpo(argv: list[str]) -> None:
    from mmalign.distributed import process_state
    from video.physdpo import build_physdpo_pairs
    from vision.train import load_vlm

    job = load_config(PhysDPOJob, argv, description="PhysDPO pairs")
    model, processor = load_vlm(job.model, trust_remote_code=job.trust_remote_code, dtype=job.dtype)
    report = build_physdpo_pairs(model.to(process_state().device), processor, job.physdpo)
    print(report)


def llava_hound(argv: list[str]) -> None:
    from video.formats import from_llava_hound

    parser = argparse.ArgumentParser(description="LLaVA-Hound-DPO records -> pair folder")
    parser.add_argument("--src", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--video_root", required=True)
    parser.add_argument("--skip_bad", action="store_true")
    args = parser.parse_args(argv)
    written, skipped = from_llava_hound(args.src, args.out, video_root=args.video_root, skip_bad=args.skip_bad)
    print(f"{written} pairs written to {args.out}; {len(skipped)} records skipped")


COMMANDS = {"physdpo": physdpo, "llava_hound": llava_hound}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: make_video_pairs.py {{{','.join(COMMANDS)}}} ...")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
