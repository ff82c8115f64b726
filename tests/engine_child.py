"""Child process for engine tests: trains the tiny causal LM on toy colour pairs.

Usage: python tests/engine_child.py OUT_DIR MAX_STEPS BATCH_SIZE GRAD_ACCUM [--resume] [--sleep S] [--workers N]
Also run under ``accelerate launch --multi_gpu --num_processes 2`` for the distributed test.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmalign.engine import TrainConfig, train
from mmalign.text import CausalLMAdapter
from mmalign.tiny import cached_tiny
from mmalign.toy import colour_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("max_steps", type=int)
    ap.add_argument("batch_size", type=int)
    ap.add_argument("grad_accum", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = cached_tiny("causal_lm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    pairs, _ = colour_pairs(seed=0)
    cfg = TrainConfig(
        output_dir=args.out, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.lr, save_every=1, keep_last=2, resume=args.resume, trackers=[], progress=False,
        plot=False, warmup_steps=2, lr_scheduler="cosine", num_workers=args.workers,
    )

    def slow(_info) -> None:
        time.sleep(args.sleep)

    train(model, CausalLMAdapter(tok, max_length=32), pairs[:64], cfg, callbacks=[slow] if args.sleep else [])


if __name__ == "__main__":
    main()
