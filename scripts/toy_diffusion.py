"""Toy evidence: on a tiny SD (or SD3) pipeline, "chosen images are brighter" moves the model toward brighter samples.

    python scripts/toy_diffusion.py --out runs/toy_diffusion --steps 200
    python scripts/toy_diffusion.py --pipeline tiny:sd3 --out runs/toy_diffusion_sd3   # flow matching

1. Data (no downloads): 32x32 images of smooth random patterns at a random brightness; in each pair
   the chosen image is brighter than the rejected one by >= 0.2. Prompt "a photo"; per-side
   captions "a bright photo" / "a dark photo" (DCPO). 96 training pairs, 32 held-out pairs.
2. VAE: mmalign.tiny's VAEs are random, so a decoded sample's brightness means nothing (and a
   decode -> encode round trip nearly erased it: data latents projected on the dark -> bright axis
   scored 1.0 / 0.0 before the round trip and 0.61 / 0.60 after it on SD, 0.63 / 0.61 on SD3).
   ``diffusion.toy.pretrain_vae`` first trains the VAE as an autoencoder on both sides' images
   (``--vae_steps``) and sets its latent scaling (SD: ``scaling_factor = 1/std``; SD3: also
   ``shift_factor = mean``) so the latents have std 1, as in real checkpoints; the held-out
   reconstruction error is printed.
3. Base model: the denoiser (random init, mmalign.tiny) then learns to denoise the latents of both
   sides (a plain denoising loop, ``--sft_steps``), so its samples look like the data, half bright,
   half dark.
4. Diffusion-DPO, MaPO and DCPO each train a LoRA on the base with ``mmalign.engine.train``.
   Reported per objective: held-out implicit accuracy (the loss's chosen reward > rejected reward,
   and plain policy MSE chosen < rejected) over fixed noise draws, and the mean *pixel* brightness
   in [0, 1] of 32 fresh samples (same seeds) decoded by the trained VAE, before and after, next to
   the data's (chosen ~0.61, rejected ~0.36 on the training pairs). The samples' mean latent score
   (projection on the axis from the mean dark latent, 0, to the mean bright latent, 1) is a
   secondary measure.

SD3 (``--pipeline tiny:sd3``, flow matching, velocity target ``noise - x0``) gets a wider
transformer (``--width``, default 128 for tiny:sd3): mmalign.tiny's SD3 transformer is 32 wide, but
a 2x2 patch of its 16-channel latent has 64 values, so it cannot even pass the noise through. With
the random VAE (before ``pretrain_vae`` existed) its pretraining loss stalled at 0.85 (0.82 with 800
steps at lr 3e-3) and its samples did not spread like the data, while width 128 (4 heads x 32, 0.51 M
parameters) reached 0.46.

Measured (200 VAE + 400 pretraining + 200 LoRA steps, one thread; pixel brightness of 32 samples,
data: rejected 0.358, chosen 0.611; held-out VAE reconstruction MSE 0.067 -> 0.005 on SD, 0.081 ->
0.005 on SD3):

* tiny:sd, base 0.488: diffusion_dpo -> 0.544, mapo -> 0.560, dcpo -> 0.587.
* tiny:sd3, base 0.281 (darker than the rejected images: the base model is weak): mapo -> 0.642,
  while diffusion_dpo (0.282) and dcpo (0.290) reach implicit accuracy 1.0 on held-out pairs
  (train loss ~3e-5) without moving the samples.

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
from typing import Any

import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.cache import build_cache
from diffusion.toy import (
    brightness_axis,
    brightness_pairs,
    data_brightness,
    denoiser,
    latent_score,
    pair_pixels,
    pixel_brightness,
    pretrain_denoiser,
    pretrain_vae,
    reconstruction_error,
    sample_latents,
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
VAE_STEPS = 200
N_SAMPLES = 32


def sample_brightness(pipe: Any, axis: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Mean pixel brightness (headline) and mean latent score (secondary) of the same fresh samples."""
    latents = sample_latents(pipe, N_SAMPLES)
    return {"pixels": float(pixel_brightness(pipe, latents).mean()), "latents": float(latent_score(latents, axis).mean())}


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
    ap.add_argument("--vae_steps", type=int, default=VAE_STEPS, help="autoencoder steps of the tiny VAE")
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
    held_pixels = torch.cat(pair_pixels(held))
    vae_before = reconstruction_error(pipe.vae, held_pixels)
    t0 = time.time()
    pretrain_vae(pipe, train_pairs, args.vae_steps, seed=0)
    vae_after = reconstruction_error(pipe.vae, held_pixels)
    data_chosen, data_rejected = data_brightness(train_pairs)
    print(f"VAE pretrain: {time.time() - t0:.0f} s; held-out reconstruction MSE {vae_before:.4f} -> {vae_after:.4f}; "
          f"scaling_factor {pipe.vae.config.scaling_factor:.4f}, shift_factor "
          f"{getattr(pipe.vae.config, 'shift_factor', None)}", flush=True)
    adapter = DiffusionAdapter(pipe)  # after pretrain_vae: the adapter reads the VAE's latent scaling
    print(f"denoiser: {sum(p.numel() for p in denoiser(pipe).parameters()) / 1e6:.2f} M parameters", flush=True)
    t0 = time.time()
    sft_losses = pretrain_denoiser(pipe, adapter, train_pairs, args.sft_steps, seed=0, lr=args.sft_lr)
    print(f"pretrain: {time.time() - t0:.0f} s; loss first 20 {sum(sft_losses[:20]) / 20:.3f}, "
          f"last 50 {sum(sft_losses[-50:]) / 50:.3f}", flush=True)
    betas = {k: float(v) for k, v in (kv.split("=") for kv in args.betas.split(",") if kv)}
    base_unet = copy.deepcopy(denoiser(pipe))
    axis = brightness_axis(adapter, train_pairs)
    before = sample_brightness(pipe, axis)
    train_batch = adapter.collate(train_pairs)
    data = latent_score(adapter.encode_images(torch.cat(
        [train_batch[f"{side}_pixel_values"] for side in ("chosen", "rejected")])), axis)
    results: dict[str, dict[str, float]] = {
        "data": {"chosen_pixel_brightness": data_chosen, "rejected_pixel_brightness": data_rejected,
                 "vae_held_out_mse_before": vae_before, "vae_held_out_mse_after": vae_after,
                 "latent_score_mean": float(data.mean()), "latent_score_std": float(data.std())},
        "base": before,
    }
    print(f"base model: mean pixel brightness of {N_SAMPLES} fresh samples {before['pixels']:.3f} (data: rejected "
          f"{data_rejected:.3f}, chosen {data_chosen:.3f}); latent score {before['latents']:.3f} (data: mean "
          f"{data.mean():.3f}, std {data.std():.3f})", flush=True)
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
        after = sample_brightness(pipe, axis)
        results[name] = {"seconds": seconds, "pixel_brightness_before": before["pixels"],
                         "pixel_brightness_after": after["pixels"], "latent_score_before": before["latents"],
                         "latent_score_after": after["latents"],
                         **{f"before_{k}": before_m[k] for k in KEYS}, **{f"after_{k}": after_m[k] for k in KEYS},
                         "final_train_loss": result.metrics[-1]["loss"]}
        print(f"{name}: held-out implicit accuracy {before_m[KEYS[0]]:.3f} -> {after_m[KEYS[0]]:.3f}, chosen-MSE-lower "
              f"rate {before_m[KEYS[1]]:.3f} -> {after_m[KEYS[1]]:.3f}; mean pixel brightness {before['pixels']:.3f} -> "
              f"{after['pixels']:.3f} (data: rejected {data_rejected:.3f}, chosen {data_chosen:.3f}); latent score "
              f"{before['latents']:.3f} -> {after['latents']:.3f}; {seconds:.0f} s", flush=True)
    (out / "toy_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
