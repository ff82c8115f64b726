"""Command-line jobs of the vision package: ``mmalign train-vlm`` and ``mmalign make-pairs {stic,trl}``.

``scripts/train_vlm.py`` and ``scripts/make_pairs.py`` call these functions. Every job runs under
``accelerate launch``: training through the engine's accelerator, STIC stage 1 with one shard of
images per process, merged by the first process when all are done.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.config import help_, load_config
from vision.stic import STICConfig

__all__ = ["STICJob", "export", "generate", "stic_pairs", "train_vlm", "trl_pairs"]


def train_vlm(argv: Sequence[str] | None = None) -> int:
    """Preference-optimise a vision-language model (DPO and friends; STIC, POVID, SCL configs).

    Every field of ``vision.train.VLMTrainConfig`` is a flag and a YAML key (``--config c.yaml``; nested
    engine settings as ``--train.<field>``). ``--model`` takes a folder, a hub name or tiny:<family>.
    """
    from mmalign.distributed import process_state
    from vision.train import VLMTrainConfig, run

    config = load_config(VLMTrainConfig, argv, description=train_vlm.__doc__)
    result = run(config)
    if process_state().is_main_process:
        print(json.dumps(result.summary(), indent=1))
    return 0


@dataclass
class STICJob:
    """STIC stage 1: self-constructed preference pairs from a folder of unlabeled images."""

    model: str = field(default="", metadata=help_("policy: folder, hub name or tiny:<family>"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own code"))
    stic: STICConfig = field(default_factory=STICConfig, metadata=help_("stage-1 settings"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required (a model folder, hub name or tiny:<family>)")


def stic_pairs(argv: Sequence[str] | None = None) -> int:
    """STIC stage 1: the policy describes clean images (chosen) and hacked inputs (rejected); resumable.

    ``--stic.image_dir IMAGES --stic.out_dir OUT``; re-run the same command to resume. Under
    ``accelerate launch`` each process writes its own shard and the first merges them.
    """
    from mmalign.distributed import process_state
    from vision.stic import build_stic_pairs, check_stic_folders
    from vision.train import load_vlm

    job = load_config(STICJob, argv, description=stic_pairs.__doc__)
    try:  # the inputs first: a typo must not cost the minutes of loading a 7B model
        check_stic_folders(job.stic)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"make-pairs stic: {exc}") from exc
    model, processor = load_vlm(job.model, trust_remote_code=job.trust_remote_code)
    model.to(process_state().device)
    report = build_stic_pairs(model, processor, job.stic)
    print(report)
    return 0


def trl_pairs(argv: Sequence[str] | None = None) -> int:
    """Convert TRL preference records (JSONL/JSON/parquet with prompt, chosen, rejected, images) into a pair folder."""
    from mmalign.pairs import from_trl

    parser = argparse.ArgumentParser(prog="mmalign make-pairs trl", description=trl_pairs.__doc__,
                                     allow_abbrev=False)
    parser.add_argument("--src", required=True, help="TRL records file or folder")
    parser.add_argument("--out", required=True, help="pair folder to write")
    parser.add_argument("--image_root", default=None,
                        help="folder the records' image paths are relative to (default: the records' folder)")
    args = parser.parse_args(argv)
    print(from_trl(args.src, args.out, image_root=args.image_root))
    return 0


def export(argv: Sequence[str] | None = None) -> int:
    """Merge a trained LoRA adapter into its base model and save the result (save_pretrained + model card)."""
    from mmalign.export import merge_adapter, push_to_hub

    parser = argparse.ArgumentParser(prog="mmalign export", description=export.__doc__, allow_abbrev=False)
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (a run's output_dir/adapter)")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base_model", default=None,
                        help="base model folder or name (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--auto_class", default="AutoModelForImageTextToText",
                        help="transformers class of the base (default: %(default)s; AutoModelForCausalLM for text)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also upload the merged folder")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.adapter, args.out, auto_class=args.auto_class, base_model=args.base_model)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"export: {exc}") from exc
    print(f"merged model written to {out}")
    if args.push_to_hub:
        print(push_to_hub(out, args.push_to_hub))
    return 0


def generate(argv: Sequence[str] | None = None) -> int:
    """Answer questions about images with a VLM, and with its trained adapter beside the base (answers.jsonl)."""
    import torch

    from mmalign.pairs import load_image
    from vision.generate import GenerationSettings, generate_responses
    from vision.train import load_vlm

    parser = argparse.ArgumentParser(prog="mmalign generate vlm", description=generate.__doc__, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="base model: folder, hub name or tiny:<family>")
    parser.add_argument("--adapter", default=None, help="a trained PEFT adapter folder (run/adapter): answers with "
                                                        "and without it, side by side")
    parser.add_argument("--images", nargs="+", required=True, help="image files, or folders of images")
    parser.add_argument("--question", default="Describe the image in detail.", help="asked of every image "
                                                                                     "(default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write answers.jsonl here (default: print only)")
    args = parser.parse_args(argv)
    files: list[Path] = []
    for item in map(Path, args.images):
        files += sorted(p for p in item.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}) \
            if item.is_dir() else [item]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise SystemExit(f"generate: no such image(s): {missing or args.images}")
    images = [[load_image(f)] for f in files]  # the inputs first: a typo must not cost loading a model
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"generate: --adapter {args.adapter} is not a trained adapter folder (no "
                         "adapter_config.json; training writes <output_dir>/adapter)")
    model, processor = load_vlm(args.model)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    questions = [args.question] * len(files)
    rows = [{"image": str(f), "question": args.question} for f in files]
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        with model.disable_adapter(), torch.no_grad():
            base = generate_responses(model, processor, questions, images, settings)
        tuned = generate_responses(model, processor, questions, images, settings)
        for row, b, t in zip(rows, base, tuned, strict=True):
            row.update(base=b.strip(), adapter=t.strip())
    else:
        for row, answer in zip(rows, generate_responses(model, processor, questions, images, settings), strict=True):
            row["answer"] = answer.strip()
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return 0
