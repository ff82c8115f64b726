"""Command-line jobs of the video package: ``train-video`` and the pair builders ``physdpo``, ``llava-hound``.

``scripts/train_video.py`` and ``scripts/make_video_pairs.py`` call these functions; each is a job of the
``mmalign`` command's shape (``fn(argv) -> int``, first docstring line = its help). Every job runs under
``accelerate launch``: training through the engine's accelerator, PhysDPO generation with one shard of
records per process, merged by the first process when all are done.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmalign.config import help_, load_config
from video.physdpo import PhysDPOConfig

__all__ = ["PhysDPOJob", "llava_hound_pairs", "physdpo_pairs", "train_video"]


def train_video(argv: Sequence[str] | None = None) -> int:
    """Preference-optimise a video LLM (DPO and friends; PhysDPO configs for LLaVA-OneVision, NeXT-Video, Qwen2.5-VL).

    Every field of ``video.train.VideoTrainConfig`` is a flag and a YAML key (``--config c.yaml``; nested
    engine settings as ``--train.<field>``). ``--model`` takes a folder, a hub name or tiny:<family>.
    """
    from mmalign.distributed import process_state
    from video.train import VideoTrainConfig, run

    config = load_config(VideoTrainConfig, argv, description=train_video.__doc__)
    result = run(config)
    if process_state().is_main_process:
        print(json.dumps(result.summary(), indent=1))
    return 0


@dataclass
class PhysDPOJob:
    """PhysDPO pair generation: the policy plus :class:`video.physdpo.PhysDPOConfig`."""

    model: str = field(default="", metadata=help_("policy: folder, hub name or tiny:<family>"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    physdpo: PhysDPOConfig = field(default_factory=PhysDPOConfig, metadata=help_("generation settings"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required (a model folder, hub name or tiny:<family>)")


def physdpo_pairs(argv: Sequence[str] | None = None) -> int:
    """PhysDPO: the policy answers under a misleading title, one frame and 1/16 resolution (rejected); resumable.

    ``--physdpo.records QA.jsonl --physdpo.out_dir OUT``; re-run the same command to resume. Under
    ``accelerate launch`` each process writes its own shard and the first merges them.
    """
    from mmalign.distributed import process_state
    from video.physdpo import build_physdpo_pairs
    from vision.train import load_vlm

    job = load_config(PhysDPOJob, argv, description=physdpo_pairs.__doc__)
    model, processor = load_vlm(job.model, trust_remote_code=job.trust_remote_code, dtype=job.dtype)
    model.to(process_state().device)
    print(build_physdpo_pairs(model, processor, job.physdpo))
    return 0


def llava_hound_pairs(argv: Sequence[str] | None = None) -> int:
    """Convert LLaVA-Hound-DPO records (prompt, chosen, rejected, video; JSON or JSONL) into a pair folder."""
    from video.formats import from_llava_hound

    parser = argparse.ArgumentParser(prog="mmalign make-pairs llava-hound", description=llava_hound_pairs.__doc__,
                                     allow_abbrev=False)
    parser.add_argument("--src", required=True, help="LLaVA-Hound records (.json list or .jsonl)")
    parser.add_argument("--out", required=True, help="pair folder to write")
    parser.add_argument("--video_root", required=True, help="folder of the videos (files or frame folders)")
    parser.add_argument("--skip_bad", action="store_true", help="skip and count bad records instead of stopping")
    args = parser.parse_args(argv)
    written, skipped = from_llava_hound(args.src, args.out, video_root=args.video_root, skip_bad=args.skip_bad)
    print(f"{written} pairs written to {args.out}; {len(skipped)} records skipped")
    return 0
