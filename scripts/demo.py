"""`make demo`: the main jobs on the built-in toy data, with tiny models built here (no downloads).

1. Diffusion-DPO (LoRA) on a tiny SD pipeline with the toy preference "chosen images are brighter":
   held-out accuracy, and the mean pixel brightness of 32 fresh samples before and after next to the
   data's (the tiny VAE is random, so it is first trained briefly to reconstruct the toy images).
2. ReNO: optimise the initial noise of the tiny one-step pipeline for 8 prompts against a
   "redness" reward, from Python.
3. DPO of a tiny causal LM on the colour-copy rule, held-out accuracy before and after.
Every number printed is measured in this run; outputs (plots, grids) go to --out.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.reno import optimize_noise, save_report
from diffusion.toy import brightness_pairs, brightness_score, data_brightness, pretrain_denoiser, pretrain_vae
from diffusion.train import load_pipeline
from mmalign.engine import TrainConfig, evaluate, train
from mmalign.rewards import CallableReward, mean_redness
from mmalign.text import CausalLMAdapter
from mmalign.toy import colour_pairs

VAE_STEPS = 200


def diffusion_dpo(out: Path, steps: int) -> None:
    pairs = brightness_pairs(out / "pairs", 96, seed=0, prefix="t")
    held = brightness_pairs(out / "held_out", 32, seed=1, prefix="h")
    pipe = load_pipeline("tiny:sd")
    pretrain_vae(pipe, pairs, VAE_STEPS)  # the tiny VAE is random: teach it to reconstruct the toy images first
    adapter = DiffusionAdapter(pipe)  # built after pretrain_vae, which sets the VAE's latent scaling
    pretrain_denoiser(pipe, adapter, pairs, 400)
    base = copy.deepcopy(pipe.unet)
    data_chosen, data_rejected = data_brightness(pairs)
    cfg = TrainConfig(output_dir=str(out / "run"), loss="diffusion_dpo", loss_kwargs={"beta": 5000.0}, lora_r=8,
                      lora_alpha=8, learning_rate=5e-4, batch_size=8, max_steps=steps, trackers=[])
    before = evaluate(base, adapter, held, ref_model=base, config=cfg, batch_size=32, seed=1, draws=4)
    bright_before = brightness_score(pipe, n=32)
    policy = train(pipe.unet, adapter, pairs, cfg).model.eval()
    after = evaluate(policy, adapter, held, ref_model=base, config=cfg, batch_size=32, seed=1, draws=4)
    bright_after = brightness_score(pipe, n=32)
    print(f"[diffusion-dpo] {steps} LoRA steps on 96 pairs; held-out (32 pairs x 4 noise draws):")
    print(f"  implicit accuracy      {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
          "  (a tie counts half: 0.5 = policy equals reference)")
    print(f"  chosen-MSE-lower rate  {before['preference/accuracy']:.3f} -> {after['preference/accuracy']:.3f}")
    print(f"  mean pixel brightness of 32 fresh samples {bright_before:.3f} -> {bright_after:.3f}  "
          f"(data: rejected {data_rejected:.3f}, chosen {data_chosen:.3f})")
    print(f"  curves: {out / 'run' / 'metrics.png'}")


def reno(out: Path, steps: int) -> None:
    pipe = load_pipeline("tiny:sd", scheduler="euler")
    prompts = ["a red apple", "a blue car", "a green field", "a cat on a mat",
               "a sunset over the sea", "a city at night", "a bowl of soup", "an old castle"]
    res = optimize_noise(pipe, prompts, [CallableReward(mean_redness, "redness")], steps=steps, progress=False)
    save_report(res, out)
    improved = int((res.best_rewards > res.initial_rewards).sum())
    print(f"[reno] {steps} iterations, 8 prompts: mean redness {res.initial_rewards.mean():.3f} -> "
          f"{res.best_rewards.mean():.3f}; improved on {improved}/8 prompts; "
          f"{res.iteration_times.mean() * 1000:.0f} ms per iteration; images and plot in {out}")


def text_dpo(out: Path, steps: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.tiny import cached_tiny

    path = cached_tiny("causal_lm")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ref, adapter = copy.deepcopy(model), CausalLMAdapter(tok, max_length=32)
    pairs, held = colour_pairs(seed=0)
    cfg = TrainConfig(output_dir=str(out), max_steps=steps, batch_size=8, learning_rate=3e-3, trackers=[])
    before = evaluate(model, adapter, held, ref_model=ref, config=cfg)
    after = evaluate(train(model, adapter, pairs, cfg).model, adapter, held, ref_model=ref, config=cfg)
    print(f"[text-dpo] {steps} steps; held-out pairs with unseen colour/object combinations: implicit accuracy "
          f"{before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f} (0.5 = untrained), margin "
          f"{before['rewards/margins']:.3f} -> {after['rewards/margins']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--steps", type=int, default=200, help="training steps of each preference run")
    ap.add_argument("--reno-steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and never spin-waits
    marker = args.out / ".mmalign-demo"
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        raise SystemExit(f"demo: {args.out} is not empty and was not made by the demo; pass another --out")
    shutil.rmtree(args.out, ignore_errors=True)  # an earlier demo's outputs: replaced
    args.out.mkdir(parents=True)
    marker.write_text("made by scripts/demo.py; the next demo run replaces this folder\n")
    diffusion_dpo(args.out / "diffusion_dpo", args.steps)
    reno(args.out / "reno", args.reno_steps)
    text_dpo(args.out / "text_dpo", args.steps)


if __name__ == "__main__":
    main()
