"""Score a pair dataset with alignment diagnostics and list the highest-CHES pairs to drop.

    python scripts/diagnose.py DATASET --model MODEL_DIR --adapter text|vlm [--drop-fraction 0.1]

Writes ``OUT/ches.jsonl`` (one row per pair: id, ches, ches_ln, chosen/rejected log-probs, top-k
mass and entropy) and ``OUT/dropped_ids.txt`` (the ``--drop-fraction`` of pairs with the highest
length-normalised CHES, as the paper filters; ``--raw`` ranks by unnormalised CHES).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmalign.diagnostics import filter_by_ches, score_pairs
from mmalign.pairs import read_pairs


def build(kind: str, model_dir: str, dataset: str, max_length: int) -> tuple[torch.nn.Module, object]:
    import transformers

    if kind == "text":
        from mmalign.text import CausalLMAdapter

        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        return model, CausalLMAdapter(tokenizer, max_length=max_length)
    if kind == "vlm":
        from vision.adapter import VLMAdapter

        processor = transformers.AutoProcessor.from_pretrained(model_dir)
        model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
        return model, VLMAdapter(processor, media_root=dataset, max_length=max_length)
    raise ValueError(f"unknown adapter kind {kind!r}; use 'text' or 'vlm'")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="pair dataset folder (pairs.jsonl / parquet / HF datasets)")
    parser.add_argument("--model", required=True, help="local model folder (HF format)")
    parser.add_argument("--adapter", choices=["text", "vlm"], required=True)
    parser.add_argument("--out", default=None, help="output folder (default: DATASET/diagnostics)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--drop-fraction", type=float, default=0.1)
    parser.add_argument("--raw", action="store_true", help="rank by unnormalised CHES")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pairs = read_pairs(args.dataset)
    model, adapter = build(args.adapter, args.model, args.dataset, args.max_length)
    model.to(args.device).eval()
    rows = score_pairs(model, adapter, pairs, batch_size=args.batch_size, topk=args.topk)
    key = "ches" if args.raw else "ches_ln"
    _, dropped = filter_by_ches(rows, [r[key] for r in rows], args.drop_fraction)

    out = Path(args.out) if args.out else Path(args.dataset) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ches.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "dropped_ids.txt").write_text("".join(f"{r['id']}\n" for r in dropped))
    scores = torch.tensor([r[key] for r in rows])
    print(
        f"{len(rows)} pairs; {key} mean {scores.mean():.4g}, median {scores.median():.4g}, max {scores.max():.4g}; "
        f"{len(dropped)} highest listed in {out / 'dropped_ids.txt'}"
    )


if __name__ == "__main__":
    main()
