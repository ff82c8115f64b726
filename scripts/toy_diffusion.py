"""Toy evidence for text-to-image preference training: Diffusion-DPO, MaPO and DCPO on the toy world.

    python scripts/toy_diffusion.py --out runs/toy_t2i                 # the three demos, shared pairs
    python scripts/toy_diffusion.py --out runs/toy_t2i --methods mapo  # one of them
    python scripts/toy_diffusion.py --out runs/t --methods mapo --seed 3 --steps 300 --lr 2e-3 --lora-r 0
                                                                       # one setting of the tuning grid
    python scripts/toy_diffusion.py --build toy_models/t2i             # rebuild the shipped pipeline

The base model, the preference pairs (the model's own samples labelled by the toy world's pixel
checker), the metrics fixed in advance and the measured numbers are described in
``diffusion/toyworld.py``. Each demo writes ``<out>/<method>/`` (engine metrics and curves,
``before_after.png``, ``rows.json``); the table is printed and written to ``<out>/rows.md``. Steps,
learning rate and LoRA rank default to each method's ``DEMO_SETTINGS`` (the tuned ones).
One thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion.toyworld import METHODS, build_toy_t2i, run_demo
from mmalign.report import rows_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy_t2i")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the method's DEMO_SETTINGS)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: DEMO_SETTINGS)")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank, 0 = every UNet weight (default: DEMO_SETTINGS)")
    ap.add_argument("--build", default=None, help="build the toy pipeline into this folder and stop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.process_time()
    if args.build:
        print(build_toy_t2i(Path(args.build), seed=args.seed))
        print(f"{time.process_time() - t0:.0f} s CPU")
        return
    rows = []
    for method in args.methods.split(","):
        rows += run_demo(method, args.out, seed=args.seed, steps=args.steps, learning_rate=args.lr,
                         lora_r=args.lora_r)
    table = rows_markdown(rows)
    Path(args.out, "rows.md").write_text(table)
    print(table)
    print(f"{time.process_time() - t0:.0f} s CPU")


if __name__ == "__main__":
    main()
