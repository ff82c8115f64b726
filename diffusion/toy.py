"""Toy text-to-image preference (no downloads): "chosen images are brighter".

Used by ``scripts/toy_diffusion.py`` (the evidence run), ``scripts/demo.py`` and tests.

1. ``brightness_pairs``: 32x32 smooth random patterns; in each pair the chosen image is brighter
   than the rejected one by 0.2-0.3. Prompt "a photo"; per-side captions "a bright photo" /
   "a dark photo" (for DCPO).
2. ``pretrain_denoiser``: the tiny SD UNet (random init) first learns to denoise both sides' images,
   so its samples look like the data: half bright, half dark.
3. ``brightness_score``: the tiny pipeline's VAE is random, so brightness is measured in *latent*
   space: a sample's score is its projection on the axis from the mean latent of dark images (0) to
   the mean latent of bright images (1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.pso import sample_images
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

__all__ = ["SCORE_SPACES", "brightness_axis", "brightness_pairs", "brightness_score", "denoiser", "latent_score", "pattern",
           "pretrain_denoiser", "sample_latents", "set_denoiser",
           "widen_transformer"]


def pattern(rng: np.random.Generator, brightness: float, size: int = 32) -> np.ndarray:
    """A smooth ``size x size x 3`` uint8 pattern with mean ~``brightness`` (upsampled 4x4 noise)."""
    coarse = rng.standard_normal((4, 4, 3)) * 0.12
    smooth = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
    return (np.clip(brightness + smooth, 0, 1) * 255).astype(np.uint8)


def brightness_pairs(folder: str | Path, n: int, *, seed: int, prefix: str, size: int = 32) -> list[PreferencePair]:
    """Write ``n`` pairs (chosen brighter, ``size`` px) with their images into ``folder``; return them as read back."""
    rng = np.random.default_rng(seed)
    with PairWriter(folder, durable=False) as writer:
        for i in range(n):
            dark = rng.uniform(0.15, 0.55)
            bright = dark + rng.uniform(0.2, 0.3)
            c = writer.add_media(pattern(rng, bright, size), f"img/{prefix}{i}_c.png")
            r = writer.add_media(pattern(rng, dark, size), f"img/{prefix}{i}_r.png")
            writer.write(PreferencePair(id=f"{prefix}{i}", prompt="a photo", chosen="", rejected="",
                                        chosen_media=[c], rejected_media=[r],
                                        chosen_caption="a bright photo", rejected_caption="a dark photo"))
    return read_pairs(folder)


def denoiser(pipe: Any) -> torch.nn.Module:
    """The pipeline's trainable denoiser: its transformer (SD3, Flux) or else its UNet."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else pipe.unet


def set_denoiser(pipe: Any, module: torch.nn.Module) -> None:
    """Put ``module`` where :func:`denoiser` finds it."""
    if getattr(pipe, "transformer", None) is not None:
        pipe.transformer = module
    else:
        pipe.unet = module


def widen_transformer(pipe: Any, inner_dim: int, *, seed: int = 0) -> torch.nn.Module:
    """Replace the pipeline's transformer by a freshly initialised one of hidden width ``inner_dim``
    (same heads, layers, patch and conditioning sizes; ``caption_projection_dim = inner_dim``); returns it.

    The tiny SD3 transformer of :func:`mmalign.tiny.make_tiny_sd3` is 32 wide while a 2x2 patch of its
    16-channel latent has 64 values, so it cannot even carry the noise through (see the toy's docstring).
    """
    module = getattr(pipe, "transformer", None)
    if module is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer to widen")
    heads = int(module.config.num_attention_heads)
    if inner_dim <= 0 or inner_dim % heads:
        raise ValueError(f"inner_dim must be a positive multiple of num_attention_heads={heads}, got {inner_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = type(module).from_config(module.config, attention_head_dim=inner_dim // heads,
                                        caption_projection_dim=inner_dim)
    wide = wide.to(device=next(module.parameters()).device)
    pipe.transformer = wide
    return wide


def pretrain_denoiser(pipe: Any, adapter: DiffusionAdapter, pairs: list[PreferencePair], steps: int, *,
                      seed: int = 0, lr: float = 1e-3, batch_size: int = 8) -> list[float]:
    """Plain denoising loss on both sides' images: the base model a preference run starts from
    (the pipeline's UNet, or its transformer for flow-matching pipelines)."""
    unet = denoiser(pipe).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pairs), (batch_size,), generator=g).tolist()
        batch = adapter.prepare(adapter.collate([pairs[i] for i in idx]), generator=g)
        out = adapter.logps(unet, batch)
        loss = (out.chosen + out.rejected).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval()
    return losses


@torch.no_grad()
def brightness_axis(adapter: DiffusionAdapter, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dark mean latent, bright mean latent)``, flattened, from the pairs' rejected/chosen images."""
    enc = adapter.collate(pairs)
    lat = adapter.encode_images(torch.cat([enc["chosen_pixel_values"], enc["rejected_pixel_values"]])).flatten(1)
    return lat[len(pairs):].mean(0), lat[: len(pairs)].mean(0)


SCORE_SPACES = ("pixels", "latents")


@torch.no_grad()
def sample_latents(pipe: Any, n: int = 32, *, steps: int = 20, seed: int = 4242, batch_size: int = 16,
                   prompt: str = "a photo") -> torch.Tensor:
    """``n`` samples of ``prompt`` as the pipeline's final (scaled) latents ``(n, C, h, w)``, no VAE decode.

    Sample ``i`` starts from unit noise drawn with seed ``seed + i`` (guidance 1.0, i.e. no CFG); the
    latents are in the space of :meth:`DiffusionAdapter.encode_images` (``(z - shift) * scale``).
    """
    module = denoiser(pipe)
    was_training = module.training
    module.eval()
    side = int(module.config.sample_size)
    channels = int(module.config.in_channels)
    out = []
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
            noise = torch.cat([torch.randn((1, channels, side, side), generator=g) for g in gens])
            device = next(module.parameters()).device
            result = pipe(prompt=[prompt] * count, num_inference_steps=steps, guidance_scale=1.0,
                          latents=noise.to(device), generator=gens, output_type="latent")
            out.append(result.images.float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out)


def latent_score(latents: torch.Tensor, axis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample brightness score ``(N,)`` of latents ``(N, C, h, w)``: projection on dark (0) -> bright (1)."""
    dark, bright = axis
    direction = bright - dark
    return (latents.flatten(1).to(direction) - dark) @ direction / direction.dot(direction)


@torch.no_grad()
def brightness_score(pipe: Any, adapter: DiffusionAdapter, axis: tuple[torch.Tensor, torch.Tensor], *,
                     n: int = 32, steps: int = 20, seed: int = 4242, space: str = "pixels") -> float:
    """Mean latent-brightness score of ``n`` fresh samples of "a photo" (same seeds every call).

    ``space="pixels"``: the samples are decoded to 8-bit images and re-encoded by the VAE (the SD toy's
    original measure). ``space="latents"``: the sampler's final latents are scored directly. The tiny
    pipelines' VAEs are random, so the decode -> encode round trip is far from the identity and nearly
    erases brightness: on the 96 training pairs, data latents score chosen 1.000 / rejected 0.000 by
    construction but 0.610 / 0.596 (tiny SD) and 0.628 / 0.606 (tiny SD3) after the round trip.
    """
    if space not in SCORE_SPACES:
        raise ValueError(f"space must be one of {SCORE_SPACES}, got {space!r}")
    if space == "latents":
        return float(latent_score(sample_latents(pipe, n, steps=steps, seed=seed), axis).mean())
    images = sample_images(pipe, ["a photo"] * n, num_inference_steps=steps, guidance_scale=1.0, seed=seed,
                           batch_size=16)
    pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for i in images])
    latents = adapter.encode_images(pixels)
    return float(latent_score(latents, axis).mean())
