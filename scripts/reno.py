"""ReNO from the command line: optimise the initial noise of a one/few-step pipeline against rewards.

    python scripts/reno.py --pipeline /models/sd-turbo --reward hpsv2=/models/HPS_v2.1.safetensors:5 \\
        --reward clip=/models/open_clip_vit_h:0.01 --out runs/reno "a red fox in the snow"
    python scripts/reno.py --pipeline /models/tiny-sd --reward redness:1 --prompts-file prompts.txt --out runs/toy

ReNO's default set (HPS 5, ImageReward 1, CLIP 0.01, PickScore 0.05): --reward hpsv2=<file or folder>
--reward imagereward=<folder> --reward clip=<folder> --reward pickscore=<folder> (weights default to ReNO's).

Writes, per prompt, the initial and optimised images side by side, plus rewards.png and rewards.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusion.reno import optimize_noise, read_prompts, save_report
from mmalign.rewards import WeightedRewards, reward_from_spec


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    p.add_argument("--prompts-file", type=Path, help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    p.add_argument("--reward", action="append", required=True,
                   help="NAME[=SOURCE][:WEIGHT], e.g. clip=/path/model:0.01, hpsv2=/path/w.safetensors:5, "
                        "imagereward=/path/ImageReward, redness:1")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture for bare weights files (ViT-H-14)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=positive_int, default=50, help="iterations: images scored; updates = steps - 1")
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--grad-clip", type=float, default=0.1)
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--num-inference-steps", type=positive_int, default=1)
    p.add_argument("--guidance-scale", type=float, default=0.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts optimised together")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--vae-checkpointing", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            prompts += read_prompts(args.prompts_file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"reno.py: {exc}") from exc
    if not prompts:
        raise SystemExit("reno.py: no prompts: pass them as arguments or with --prompts-file")
    try:  # rewards first: a bad spec or weights file is reported before the pipeline loads
        rewards = WeightedRewards([reward_from_spec(s, model_name=args.clip_arch, device=args.device)
                                   for s in args.reward])
    except (OSError, ValueError) as exc:
        raise SystemExit(f"reno.py: {exc}") from exc
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=getattr(torch, args.dtype)).to(args.device)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        result = optimize_noise(
            pipe, batch, rewards, steps=args.steps, lr=args.lr, optimizer=args.optimizer, grad_clip=args.grad_clip,
            reg_weight=args.reg_weight, seed=args.seed + start, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, height=args.height, width=args.width,
            gradient_checkpointing=args.gradient_checkpointing, vae_checkpointing=args.vae_checkpointing,
        )
        folder = args.out if len(prompts) <= args.batch_size else args.out / f"batch_{start // args.batch_size:03d}"
        save_report(result, folder)
        for p, r0, r1 in zip(batch, result.initial_rewards.tolist(), result.best_rewards.tolist(), strict=True):
            print(f"{r0:+.4f} -> {r1:+.4f}  {p}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
