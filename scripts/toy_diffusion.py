"""Toy evidence: on a tiny SD (or SD3) pipeline, "chosen images are brighter" moves the model toward brighter samples.

    python scripts/toy_diffusion.py --out runs/toy_diffusion --steps 200
    python scripts/toy_diffusion.py --pipeline tiny:sd3 --out runs/toy_diffusion_sd3   # flow matching

1. Data (no downloads): 32x32 images of smooth random patterns at a random brightness; in each pair
   the chosen image is brighter than the rejected one by >= 0.2. Prompt "a photo"; per-side
   captions "a bright photo" / "a dark photo" (DCPO). 96 training pairs, 32 held-out pairs.
2. Base model: the tiny SD UNet (random init, mmalign.tiny) first learns to denoise the images of
   both sides (a plain denoising loop, ``--sft_steps``), so its samples look like the data, half
   bright, half dark. Its VAE stays random, so brightness is measured in *latent space*: a fresh
   sample's score is its projection on the direction from the mean latent of dark images to the
   mean latent of bright images (0 = the dark mean, 1 = the bright mean).
3. Diffusion-DPO, MaPO and DCPO each train a LoRA on the base with ``mmalign.engine.train``.
   Reported per objective: held-out implicit accuracy (the loss's chosen reward > rejected reward,
   and plain policy MSE chosen < rejected) over fixed noise draws, and the mean brightness score
   of 32 fresh samples (same seeds) before and after.

SD3 (``--pipeline tiny:sd3``, flow matching, velocity target ``noise - x0``) needs two changes, both
measured on this toy (400 pretraining + 200 LoRA steps):

* a wider transformer (``--width``, default 128 for tiny:sd3): mmalign.tiny's SD3 transformer is 32
  wide, but a 2x2 patch of its 16-channel latent has 64 values, so it cannot even pass the noise
  through; its pretraining loss stalls at 0.85 (0.82 with 800 steps at lr 3e-3) and its samples do
  not spread like the data (latent score std 0.12 vs 0.60 for the data). Width 128 (4 heads x 32,
  0.51 M parameters) reaches 0.46.
* brightness scored on the sampler's latents (``--score_space``, auto = latents for every pipeline
  but tiny:sd): decoding to 8-bit pixels and re-encoding with the random VAE nearly erases
  brightness (data latents score chosen 1.0 / rejected 0.0, after the round trip 0.63 / 0.61 on
  SD3, 0.61 / 0.60 on SD), so every SD3 sample scored ~0.673 whatever the model. tiny:sd keeps the
  pixel round trip so its recorded numbers stay comparable.

The adapter's flow-matching convention was checked against the pipeline's sampler: training
``timestep = 1000 * sigma`` with the shifted training sigmas (shift 3, median 0.75), the sampler's 20
steps feed ``1000 * sigma`` too, and one scheduler step with the exact velocity lands on
``(1 - sigma_next) x0 + sigma_next noise``. Betas and learning rates are the SD ones (``--betas``
overrides a beta).

Single-threaded torch is much faster for these tiny shapes on a shared CPU (set by ``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.cache import build_cache
from diffusion.toy import (
    brightness_axis,
    brightness_pairs,
    brightness_score,
    denoiser,
    latent_score,
    pretrain_denoiser,
    set_denoiser,
    widen_transformer,
)
from diffusion.train import load_pipeline
from mmalign.engine import TrainConfig, evaluate, train

KEYS = ("rewards/accuracies", "preference/accuracy")
OBJECTIVES = {"diffusion_dpo": ("diffusion_dpo", 5000.0, "prompt"), "mapo": ("mapo", 0.1, "prompt"),
              "dcpo": ("diffusion_dpo", 500.0, "per_side")}
#: hidden width the toy gives a pipeline's transformer (see the docstring; tiny:sd's UNet is kept as built)
WIDTH = {"tiny:sd3": 128}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy_diffusion")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=400)
    ap.add_argument("--sft_lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--objectives", default="diffusion_dpo,mapo,dcpo")
    ap.add_argument("--pipeline", default="tiny:sd",
                    help="tiny:sd (UNet, epsilon) or tiny:sd3 (flow-matching transformer, velocity target)")
    ap.add_argument("--score_space", default="auto", choices=("auto", "pixels", "latents"),
                    help="where brightness is scored; auto: pixels for tiny:sd, latents otherwise")
    ap.add_argument("--width", type=int, default=None,
                    help="flow pipelines: transformer hidden width (default 128 for tiny:sd3; 0: as built)")
    ap.add_argument("--betas", default="", help="override betas, e.g. diffusion_dpo=5000,dcpo=500")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train_pairs = brightness_pairs(out / "train", 96, seed=0, prefix="t")
    held = brightness_pairs(out / "held_out", 32, seed=1, prefix="h")
    pipe = load_pipeline(args.pipeline)
    width = args.width if args.width is not None else WIDTH.get(args.pipeline, 0)
    if width:
        widen_transformer(pipe, width, seed=0)
    adapter = DiffusionAdapter(pipe)
    print(f"denoiser: {sum(p.numel() for p in denoiser(pipe).parameters()) / 1e6:.2f} M parameters", flush=True)
    t0 = time.time()
    sft_losses = pretrain_denoiser(pipe, adapter, train_pairs, args.sft_steps, seed=0, lr=args.sft_lr)
    print(f"pretrain: {time.time() - t0:.0f} s; loss first 20 {sum(sft_losses[:20]) / 20:.3f}, "
          f"last 50 {sum(sft_losses[-50:]) / 50:.3f}", flush=True)
    space = args.score_space if args.score_space != "auto" else ("pixels" if args.pipeline == "tiny:sd" else "latents")
    betas = {k: float(v) for k, v in (kv.split("=") for kv in args.betas.split(",") if kv)}
    base_unet = copy.deepcopy(denoiser(pipe))
    direction = brightness_axis(adapter, train_pairs)
    before = brightness_score(pipe, adapter, direction, space=space)
    data = latent_score(adapter.encode_images(torch.cat(
        [adapter.collate(train_pairs)[f"{side}_pixel_values"] for side in ("chosen", "rejected")])), direction)
    results: dict[str, dict[str, float | str]] = {"base": {"brightness": before, "space": space}}
    print(f"base model: brightness score {before:.3f} ({space}); data latents: mean {data.mean():.3f} std "
          f"{data.std():.3f}", flush=True)
    for name in args.objectives.split(","):
        loss, beta, mode = OBJECTIVES[name]
        beta = betas.get(name, beta)
        set_denoiser(pipe, copy.deepcopy(base_unet))
        cache = out / f"cache_{mode}"
        plain = DiffusionAdapter(pipe, caption_mode=mode)
        if not cache.is_dir():
            build_cache(plain, train_pairs, cache)
        cached = DiffusionAdapter(pipe, caption_mode=mode, cache_dir=cache)
        cfg = TrainConfig(output_dir=str(out / name), loss=loss, loss_kwargs={"beta": beta}, lora_r=8, lora_alpha=8,
                          learning_rate=args.lr, batch_size=8, max_steps=args.steps, trackers=[], progress=False,
                          plot=True, seed=0)
        t0 = time.time()
        result = train(denoiser(pipe), cached, train_pairs, cfg)
        seconds = time.time() - t0
        policy = result.model.eval()
        held_cfg = dataclasses.replace(cfg, output_dir=str(out / name / "eval"))
        before_m, after_m = (
            evaluate(m, plain, held, ref_model=base_unet, config=held_cfg, batch_size=len(held), seed=1000, draws=4)
            for m in (base_unet, policy)
        )
        after = brightness_score(pipe, adapter, direction, space=space)
        results[name] = {"seconds": seconds, "brightness_before": before, "brightness_after": after,
                         **{f"before_{k}": before_m[k] for k in KEYS}, **{f"after_{k}": after_m[k] for k in KEYS},
                         "final_train_loss": result.metrics[-1]["loss"]}
        print(name, json.dumps(results[name]), flush=True)
    (out / "toy_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
