"""Command-line jobs of the diffusion package: ``mmalign train-diffusion`` and ``mmalign reno``.

``scripts/train_diffusion.py`` and ``scripts/reno.py`` call these functions; both run unchanged
under ``accelerate launch`` (training through the engine's accelerator, ReNO split by prompt batch).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

__all__ = ["generate", "pso_pairs", "reno", "reno_parser", "train_diffusion"]


def train_diffusion(argv: Sequence[str] | None = None) -> int:
    """Preference-train a text-to-image model: Diffusion-DPO, MaPO, DCPO, PSO (SD1.5/2.1, SDXL, SD3, Flux).

    Every field of ``diffusion.train.DiffusionTrainConfig`` is a flag and a YAML key (``--config c.yaml``;
    nested engine settings as ``--train.<field>``).
    """
    from diffusion.train import DiffusionTrainConfig, run
    from mmalign.config import load_config
    from mmalign.distributed import process_state

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(DiffusionTrainConfig, argv, description=train_diffusion.__doc__)
    result = run(config)
    if not process_state().is_main_process:
        return 0
    final = result.metrics[-1] if result.metrics else {}
    print(json.dumps({
        "output_dir": str(result.output_dir),
        "lora": str(result.lora_dir) if result.lora_dir else None,
        "pipeline": str(result.pipeline_dir) if result.pipeline_dir else None,
        "grid": str(result.grid_path) if result.grid_path else None,
        "ties_dropped": result.ties_dropped,
        "attention": result.attention,
        "final": {k: final[k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in final},
    }, indent=1))
    return 0


def pso_pairs(argv: Sequence[str] | None = None) -> int:
    """Offline PSO pairs: each target image (chosen) against the model's own few-step sample for its prompt.

    The targets are a pair folder whose chosen images are the images to prefer (a teacher's samples, real
    photos); their rejected side is ignored. Writes pairs.jsonl with target/ and sample/ images into --out;
    a re-run skips the pairs already written (the same seeds give the same samples).
    """
    from diffusion.pso import make_pso_pairs
    from diffusion.train import load_pipeline
    from mmalign.distributed import process_state
    from mmalign.pairs import PairFormatError, read_pairs

    parser = argparse.ArgumentParser(prog="mmalign make-pairs pso", description=pso_pairs.__doc__,
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="pipeline folder, hub name or tiny:<name>")
    parser.add_argument("--targets", required=True, help="pair folder whose chosen images are the targets")
    parser.add_argument("--out", required=True, help="pair folder to write (resumed when it exists)")
    parser.add_argument("--steps", type=_positive_int, default=1, help="sampling steps of the model's samples")
    parser.add_argument("--guidance_scale", type=float, default=0.0, help="classifier-free guidance of the samples")
    parser.add_argument("--seed", type=int, default=0, help="target i is sampled with seed + i")
    parser.add_argument("--resolution", type=_positive_int, default=None, help="sample size (default: the family's)")
    parser.add_argument("--batch_size", type=_positive_int, default=4)
    parser.add_argument("--max_sequence_length", type=_positive_int, default=None,
                        help="T5 tokens of SD3/Flux pipelines (default: the pipeline's)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if process_state().num_processes > 1:
        raise SystemExit("make-pairs pso runs in one process (the pairs are written by one writer); "
                         "run it without accelerate launch")
    try:
        targets = read_pairs(args.targets, check_media="exists")
    except (OSError, PairFormatError, ValueError) as exc:  # the data first: before minutes of model loading
        raise SystemExit(f"make-pairs pso: {exc}") from exc
    if not targets:
        raise SystemExit(f"make-pairs pso: {args.targets} holds no pairs")
    pipeline = load_pipeline(args.pretrained)
    try:
        out = make_pso_pairs(pipeline, targets, args.out, num_inference_steps=args.steps,
                             guidance_scale=args.guidance_scale, seed=args.seed, resolution=args.resolution,
                             batch_size=args.batch_size, max_sequence_length=args.max_sequence_length)
    except ValueError as exc:
        raise SystemExit(f"make-pairs pso: {exc}") from exc
    print(f"{len(targets)} PSO pairs in {out}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


RENO_DOC = """Optimise the initial noise of a one/few-step text-to-image pipeline against rewards (ReNO).

    mmalign reno --pipeline /models/sd-turbo --reward hpsv2=/models/HPS_v2.1_compressed.pt:5 \\
        --reward clip=/models/CLIP-ViT-H-14:0.01 --out runs/reno "a red fox in the snow"
    accelerate launch -m mmalign reno --pipeline tiny:sd --reward redness:1 --prompts_file p.txt --out runs/toy

ReNO's default set (HPS 5, ImageReward 1, CLIP 0.01, PickScore 0.05): --reward hpsv2=<file or folder>
--reward imagereward=<folder> --reward clip=<folder> --reward pickscore=<folder> (weights default to ReNO's).

Writes per prompt images/<i>_<slug>.png (initial | optimised) and best/<i>_<slug>.png, a record per
prompt batch (batches/, the resume point: a re-run skips finished batches), and at the end
rewards.json, rewards.png and sheet.png (every prompt labelled with its initial and best reward). Under accelerate launch each process takes every n-th batch; prompt i
starts from the noise seeded seed + i whatever the number of processes. Flags are written with
underscores (--prompts_file); the dashed forms (--prompts-file) are accepted too.
"""


def reno_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmalign reno", description=RENO_DOC, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kw: object) -> None:
        dashed = name.replace("_", "-")
        p.add_argument(*([name] if name == dashed else [name, dashed]), **kw)  # type: ignore[arg-type]

    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts_file)")
    add("--prompts_file", type=Path, help="text file, one prompt per line (blank lines skipped)")
    add("--pipeline", required=True, help="diffusers pipeline: local folder, hub name or tiny:<sd|sdxl|sd3|flux>")
    add("--reward", action="append", required=True,
        help="NAME[=SOURCE][:WEIGHT], repeatable, e.g. clip=/path/model:0.01, hpsv2=/path/w.safetensors:5, "
             "imagereward=/path/ImageReward, redness:1")
    add("--clip_arch", default=None, help="open_clip architecture for bare weights files (e.g. ViT-H-14)")
    add("--out", type=Path, required=True, help="output folder (re-run to resume)")
    add("--steps", type=_positive_int, default=50, help="iterations: images scored; updates = steps - 1 (ReNO: 50)")
    add("--lr", type=float, default=5.0, help="learning rate (ReNO: 5)")
    add("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd (Nesterov 0.9, ReNO) | adam (eps 1e-2)")
    add("--grad_clip", type=float, default=0.1, help="max gradient norm per prompt (ReNO: 0.1)")
    add("--reg_weight", type=float, default=0.01, help="noise-norm regulariser weight (ReNO: 0.01)")
    add("--num_inference_steps", type=_positive_int, default=1, help="denoiser calls per image")
    add("--guidance_scale", type=float, default=0.0, help="classifier-free guidance (turbo models: 0)")
    add("--height", type=int, default=None, help="image height (default: the pipeline's)")
    add("--width", type=int, default=None, help="image width (default: the pipeline's)")
    add("--seed", type=int, default=0, help="prompt i starts from the noise seeded seed + i")
    add("--batch_size", type=_positive_int, default=1, help="prompts optimised together")
    add("--device", default=None, help="default: this process's accelerator device (cuda:N under "
                                       "accelerate launch), else cpu")
    add("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="pipeline weights")
    add("--gradient_checkpointing", action="store_true", help="checkpoint the denoiser (less memory)")
    add("--vae_checkpointing", action="store_true", help="checkpoint the VAE decoder (less memory)")
    add("--no_progress", action="store_true", help="no progress bar")
    for action in p._actions:
        if action.default not in (None, argparse.SUPPRESS, False) and action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return p


def reno(argv: Sequence[str] | None = None) -> int:
    """ReNO: optimise the initial noise against rewards, over prompts or a prompt file; resumable, sharded."""
    import torch

    from diffusion.reno import optimize_prompt_set, read_prompts
    from diffusion.train import load_pipeline
    from mmalign.distributed import process_state
    from mmalign.rewards import WeightedRewards, reward_from_spec

    args = reno_parser().parse_args(argv)
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            prompts += read_prompts(args.prompts_file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"reno: {exc}") from exc
    if not prompts:
        raise SystemExit("reno: no prompts: pass them as arguments or with --prompts_file")
    state = process_state()
    device = args.device or str(state.device)
    try:  # rewards first: a bad spec or weights file is reported before the pipeline loads
        rewards = WeightedRewards([reward_from_spec(s, model_name=args.clip_arch, device=device)
                                   for s in args.reward])
    except (OSError, ValueError) as exc:
        raise SystemExit(f"reno: {exc}") from exc
    pipe = load_pipeline(args.pipeline, torch_dtype=getattr(torch, args.dtype)).to(device)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("prompts", "prompts_file", "out", "device", "no_progress")}
    try:
        report = optimize_prompt_set(
            pipe, prompts, rewards, args.out, batch_size=args.batch_size, seed=args.seed, run_settings=settings,
            progress=not args.no_progress, steps=args.steps, lr=args.lr, optimizer=args.optimizer,
            grad_clip=args.grad_clip, reg_weight=args.reg_weight, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, height=args.height, width=args.width,
            gradient_checkpointing=args.gradient_checkpointing, vae_checkpointing=args.vae_checkpointing,
        )
    except ValueError as exc:
        raise SystemExit(f"reno: {exc}") from exc
    if report.summary is not None:
        for row in report.summary["per_prompt"]:
            print(f"{row['initial_reward']:+.4f} -> {row['best_reward']:+.4f}  {row['prompt']}")
        print(f"{report.summary['improved']}/{report.summary['prompts']} prompts improved; wrote {args.out}")
    return 0


def generate(argv: Sequence[str] | None = None) -> int:
    """Sample images for prompts from a pipeline, with its trained LoRA beside the base (grid: base row, LoRA row)."""
    import torch

    from diffusion.pso import sample_images
    from diffusion.train import image_grid, load_pipeline
    from mmalign.distributed import process_state

    parser = argparse.ArgumentParser(prog="mmalign generate diffusion", description=generate.__doc__,
                                     allow_abbrev=False)
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline: folder, hub name or tiny:<name>")
    parser.add_argument("--lora", default=None, help="a trained LoRA folder (run/lora): base row and LoRA row")
    parser.add_argument("--prompts", nargs="+", required=True, help="one image per prompt")
    parser.add_argument("--steps", type=_positive_int, default=30, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--out", required=True, help="folder for the images and grid.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    lora_files = sorted(Path(args.lora).glob("*.safetensors")) if args.lora else []
    if args.lora and not lora_files:  # before the pipeline loads: a typo must not cost loading a model
        raise SystemExit(f"generate: --lora {args.lora} is not a trained LoRA folder (no .safetensors file in it; "
                         "training writes <output_dir>/lora)")
    pipe = load_pipeline(args.pipeline).to(process_state().device)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
              resolution=args.resolution)
    rows = {"base": sample_images(pipe, args.prompts, **kw)}
    if args.lora:
        pipe.load_lora_weights(args.lora, weight_name=lora_files[0].name)
        with torch.no_grad():
            rows["lora"] = sample_images(pipe, args.prompts, **kw)
    out.mkdir(parents=True, exist_ok=True)
    for name, images in rows.items():
        for i, image in enumerate(images):
            image.save(out / f"{name}_{i:03d}.png")
    image_grid(list(rows.values())).save(out / "grid.png")
    print(f"{len(args.prompts)} prompt(s), rows {', '.join(rows)} (seeds {args.seed}..): {out / 'grid.png'}")
    return 0
