"""Build or convert pair datasets.

    python scripts/make_pairs.py vision stic --model M --image_dir IMGS --out_dir OUT [--STICConfig flags]
    python scripts/make_pairs.py vision trl --src data.jsonl --out OUT [--image_root DIR]

``vision stic`` runs STIC stage 1 with the policy itself (shard with ``accelerate launch``; re-run
to resume). ``vision trl`` converts TRL preference records into our pair folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from mmalign.config import load_config
from vision.stic import STICConfig


@dataclass
class STICJob:
    """STIC stage 1 from the command line."""

    model: str = field(default="", metadata={"help": "policy folder or name"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})
    stic: STICConfig = field(default_factory=STICConfig, metadata={"help": "stage-1 settings"})


def vision(argv: list[str]) -> None:
    if not argv or argv[0] not in ("stic", "trl"):
        raise SystemExit("usage: make_pairs.py vision {stic,trl} ...")
    if argv[0] == "stic":
        from vision.stic import build_stic_pairs
        from vision.train import load_vlm

        job = load_config(STICJob, argv[1:], description="STIC stage 1")
        model, processor = load_vlm(job.model, trust_remote_code=job.trust_remote_code)
        print(build_stic_pairs(model, processor, job.stic))
    else:
        from mmalign.pairs import from_trl

        parser = argparse.ArgumentParser(description="TRL preference records -> pair folder")
        parser.add_argument("--src", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--image_root", default=None)
        args = parser.parse_args(argv[1:])
        print(from_trl(args.src, args.out, image_root=args.image_root))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"vision": vision}
    if not argv or argv[0] not in commands:
        raise SystemExit(f"usage: make_pairs.py {{{','.join(commands)}}} ...")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
