"""Toy evidence: on a tiny SD pipeline, "chosen images are brighter" moves the model toward brighter samples.

    python scripts/toy_diffusion.py --out runs/toy_diffusion --steps 200

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

Single-threaded torch is much faster for these tiny shapes on a shared CPU (set by ``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.cache import build_cache
from diffusion.pso import sample_images
from diffusion.train import load_pipeline
from mmalign.engine import TrainConfig, train
from mmalign.losses import LOSSES
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

OBJECTIVES = {"diffusion_dpo": ("diffusion_dpo", 5000.0, "prompt"), "mapo": ("mapo", 0.1, "prompt"),
              "dcpo": ("diffusion_dpo", 500.0, "per_side")}


def pattern(rng: np.random.Generator, brightness: float) -> np.ndarray:
    """A smooth 32x32x3 pattern with mean ~``brightness`` (upsampled 4x4 noise)."""
    coarse = rng.standard_normal((4, 4, 3)) * 0.12
    smooth = np.kron(coarse, np.ones((8, 8, 1)))
    return (np.clip(brightness + smooth, 0, 1) * 255).astype(np.uint8)


def make_data(folder: Path, n: int, seed: int, prefix: str) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    with PairWriter(folder, durable=False) as writer:
        for i in range(n):
            dark = rng.uniform(0.15, 0.55)
            bright = dark + rng.uniform(0.2, 0.3)
            c = writer.add_media(pattern(rng, bright), f"img/{prefix}{i}_c.png")
            r = writer.add_media(pattern(rng, dark), f"img/{prefix}{i}_r.png")
            writer.write(PreferencePair(id=f"{prefix}{i}", prompt="a photo", chosen="", rejected="",
                                        chosen_media=[c], rejected_media=[r],
                                        chosen_caption="a bright photo", rejected_caption="a dark photo"))
    return read_pairs(folder)


def pretrain(pipe, adapter: DiffusionAdapter, pairs: list, steps: int, seed: int) -> None:
    """Plain denoising loss on both sides' images (the 'base model' the preference run starts from)."""
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(pairs), (8,), generator=g).tolist()
        batch = adapter.prepare(adapter.collate([pairs[i] for i in idx]), generator=g)
        out = adapter.logps(unet, batch)
        loss = (out.chosen + out.rejected).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  pretrain step {step}: mse {loss.item():.4f}", flush=True)
    unet.eval()


@torch.no_grad()
def heldout_metrics(adapter, policy, reference, pairs, loss: str, beta: float, draws: int = 4) -> dict[str, float]:
    fn, acc_reward, acc_mse = LOSSES[loss], [], []
    for d in range(draws):
        batch = adapter.prepare(adapter.collate(pairs), generator=torch.Generator().manual_seed(1000 + d))
        pol = adapter.logps(policy, batch)
        if loss == "mapo":
            out = fn(pol.chosen, pol.rejected, beta=beta)
        else:
            ref = adapter.logps(reference, batch)
            out = fn(pol.chosen, pol.rejected, ref.chosen, ref.rejected, beta=beta)
        acc_reward.append((out.chosen_rewards > out.rejected_rewards).float().mean().item())
        acc_mse.append((pol.chosen < pol.rejected).float().mean().item())
    return {"implicit_accuracy": float(np.mean(acc_reward)), "mse_accuracy": float(np.mean(acc_mse))}


@torch.no_grad()
def brightness_score(pipe, adapter, direction: tuple[torch.Tensor, torch.Tensor], n: int = 32) -> float:
    images = sample_images(pipe, ["a photo"] * n, num_inference_steps=20, guidance_scale=1.0, seed=4242, batch_size=16)
    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images])
    latents = adapter.encode_images(pixels).flatten(1)
    dark, bright = direction
    axis = bright - dark
    return float(((latents - dark) @ axis / axis.dot(axis)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy_diffusion")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sft_steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--objectives", default="diffusion_dpo,mapo,dcpo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train_pairs = make_data(out / "train", 96, 0, "t")
    held = make_data(out / "held_out", 32, 1, "h")
    pipe = load_pipeline("tiny:sd")
    adapter = DiffusionAdapter(pipe)
    t0 = time.time()
    pretrain(pipe, adapter, train_pairs, args.sft_steps, seed=0)
    print(f"pretrain: {time.time() - t0:.0f} s", flush=True)
    base_unet = copy.deepcopy(pipe.unet)
    enc = adapter.collate(train_pairs)
    lat = adapter.encode_images(torch.cat([enc["chosen_pixel_values"], enc["rejected_pixel_values"]])).flatten(1)
    direction = (lat[len(train_pairs):].mean(0), lat[: len(train_pairs)].mean(0))  # (dark mean, bright mean)
    before = brightness_score(pipe, adapter, direction)
    results: dict[str, dict[str, float]] = {"base": {"brightness": before}}
    print(f"base model: brightness score {before:.3f}", flush=True)
    for name in args.objectives.split(","):
        loss, beta, mode = OBJECTIVES[name]
        pipe.unet = copy.deepcopy(base_unet)
        cache = out / f"cache_{mode}"
        plain = DiffusionAdapter(pipe, caption_mode=mode)
        if not cache.is_dir():
            build_cache(plain, train_pairs, cache)
        cached = DiffusionAdapter(pipe, caption_mode=mode, cache_dir=cache)
        cfg = TrainConfig(output_dir=str(out / name), loss=loss, loss_kwargs={"beta": beta}, lora_r=8, lora_alpha=8,
                          learning_rate=args.lr, batch_size=8, max_steps=args.steps, trackers=[], progress=False,
                          plot=True, seed=0)
        t0 = time.time()
        result = train(pipe.unet, cached, train_pairs, cfg)
        seconds = time.time() - t0
        policy = result.model.eval()
        before_m = heldout_metrics(plain, base_unet, base_unet, held, loss, beta)
        after_m = heldout_metrics(plain, policy, base_unet, held, loss, beta)
        after = brightness_score(pipe, adapter, direction)
        results[name] = {"seconds": seconds, "brightness_before": before, "brightness_after": after,
                         **{f"before_{k}": v for k, v in before_m.items()}, **{f"after_{k}": v for k, v in after_m.items()},
                         "final_train_loss": result.metrics[-1]["loss"]}
        print(name, json.dumps(results[name]), flush=True)
    (out / "toy_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
