"""Toy text-to-image preference (no downloads): "chosen images are brighter".

Used by the ``toy:brightness`` data of ``mmalign train-diffusion`` (quick smoke runs) and by tests; the demo's
evidence runs in the toy world instead (:mod:`diffusion.toyworld`).

1. ``brightness_pairs``: 32x32 smooth random patterns; in each pair the chosen image is brighter
   than the rejected one by 0.2-0.3 (mean pixel brightness about 0.6 chosen, 0.35 rejected).
   Prompt "a photo"; per-side captions "a bright photo" / "a dark photo" (for DCPO). The folder is
   complete or absent: it is written under a temporary name, fsynced, marked complete
   (:data:`TOY_MARKER`, with the pair count and settings) and renamed into place, so a run killed
   while writing leaves no half folder for the next run to train on; a complete folder is reused.
2. ``pretrain_vae``: the tiny pipelines' VAEs (:mod:`mmalign.tiny`) are random, so decoded samples say
   nothing about brightness and a decode -> encode round trip nearly erases it. The VAE is first
   trained briefly as an autoencoder on both sides' images, and its latent ``scaling_factor`` (and,
   for flow pipelines, ``shift_factor``) set so the latents have std 1, as real checkpoints do.
3. ``pretrain_denoiser``: the denoiser (random init) then learns to denoise both sides' latents, so
   its samples look like the data: half bright, half dark.
4. ``brightness_score``: the mean *pixel* brightness in [0, 1] of fresh samples decoded by that VAE
   (the same seeds every call), read against ``data_brightness`` (the chosen and rejected images'
   means). ``latent_score`` (projection on the dark -> bright axis of mean latents) is a secondary measure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.families import denoiser, family_of, set_denoiser, vae_scale_factor
from mmalign.pairs import PairWriter, PreferencePair, read_pairs

__all__ = [
    "TOY_MARKER",
    "brightness_axis",
    "brightness_pairs",
    "brightness_score",
    "data_brightness",
    "decode_latents",
    "denoiser",
    "latent_score",
    "pair_pixels",
    "pattern",
    "pixel_brightness",
    "pretrain_denoiser",
    "pretrain_vae",
    "reconstruction_error",
    "sample_latents",
    "set_denoiser",
    "widen_transformer",
]


def pattern(rng: np.random.Generator, brightness: float, size: int = 32) -> np.ndarray:
    """A smooth ``size x size x 3`` uint8 pattern with mean ~``brightness`` (upsampled 4x4 noise)."""
    coarse = rng.standard_normal((4, 4, 3)) * 0.12
    smooth = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
    return (np.clip(brightness + smooth, 0, 1) * 255).astype(np.uint8)


#: file in a finished toy folder: ``{"pairs": n, "seed": ..., "prefix": ..., "size": ...}``
TOY_MARKER = "TOY_COMPLETE.json"


def brightness_pairs(folder: str | Path, n: int, *, seed: int, prefix: str, size: int = 32,
                     replace: bool = False) -> list[PreferencePair]:
    """Write ``n`` pairs (chosen brighter, ``size`` px) with their images into ``folder``; return them as read back.

    Complete or absent: the pairs are written into a temporary sibling folder, every file is fsynced,
    the :data:`TOY_MARKER` is written, and the folder is renamed to ``folder`` in one step; an
    interruption leaves ``folder`` as it was (a stale temporary folder is removed by the next call).
    A ``folder`` already holding a complete toy set with these settings (marker and ``n`` readable
    pairs) is reused as it is. Any other existing ``folder`` (another toy set, or a partial one left
    by a version without the marker) is a ``FileExistsError``, unless ``replace`` is set: then it is
    deleted once the new set is complete (use only for folders this code owns).
    """
    folder = Path(folder)
    settings = {"pairs": int(n), "seed": int(seed), "prefix": str(prefix), "size": int(size)}
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():
        reusable = _complete_toy_pairs(folder, settings)
        if reusable is not None:
            return reusable
        if not replace:
            raise FileExistsError(
                f"{folder} exists but is not a complete toy set with {settings} (no {TOY_MARKER}, other settings, "
                "or missing pairs); delete it, pick another folder, or pass replace=True"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        rng = np.random.default_rng(seed)
        with PairWriter(tmp, durable=False) as writer:
            for i in range(n):
                dark = rng.uniform(0.15, 0.55)
                bright = dark + rng.uniform(0.2, 0.3)
                c = writer.add_media(pattern(rng, bright, size), f"img/{prefix}{i}_c.png")
                r = writer.add_media(pattern(rng, dark, size), f"img/{prefix}{i}_r.png")
                writer.write(PreferencePair(id=f"{prefix}{i}", prompt="a photo", chosen="", rejected="",
                                            chosen_media=[c], rejected_media=[r],
                                            chosen_caption="a bright photo", rejected_caption="a dark photo"))
        (tmp / TOY_MARKER).write_text(json.dumps(settings))
        _fsync_tree(tmp)
        if folder.exists():  # replace=True: the old folder goes only now that the new one is complete
            old = folder.with_name(f".{folder.name}.tmp-old")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_pairs(folder)


def _complete_toy_pairs(folder: Path, settings: dict[str, Any]) -> list[PreferencePair] | None:
    """The pairs of ``folder`` if it is a finished toy set written with ``settings``, else None."""
    try:
        if json.loads((folder / TOY_MARKER).read_text()) != settings:
            return None
        pairs = read_pairs(folder)
    except (OSError, ValueError):
        return None
    return pairs if len(pairs) == settings["pairs"] else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (one pass at the end instead of one per write)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


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


def pair_pixels(pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs' chosen and rejected images as float pixels in [0, 1], each ``(N, 3, H, W)``."""
    sides: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for pair in pairs:
        chosen, rejected = pair.load_images()
        for out, image in zip(sides, (chosen[0], rejected[0]), strict=True):
            out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(sides[0]), torch.stack(sides[1])


def data_brightness(pairs: list[PreferencePair]) -> tuple[float, float]:
    """Mean pixel brightness in [0, 1] of the pairs' ``(chosen, rejected)`` images: the scale for
    :func:`brightness_score`."""
    chosen, rejected = pair_pixels(pairs)
    return float(chosen.mean()), float(rejected.mean())


@torch.no_grad()
def reconstruction_error(vae: torch.nn.Module, pixels: torch.Tensor, *, batch_size: int = 32) -> float:
    """Mean squared error, in [0, 1] pixel units, of ``decode(posterior mean of encode(pixels))``
    against ``pixels`` ``(N, 3, H, W)`` in [0, 1]."""
    was_training = vae.training
    vae.eval()
    total = 0.0
    try:
        for start in range(0, len(pixels), batch_size):
            x = pixels[start : start + batch_size].to(next(vae.parameters()).device) * 2 - 1
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample
            total += float(((recon.clamp(-1, 1) - x) / 2).pow(2).sum())
    finally:
        vae.train(was_training)
    return total / pixels.numel()


def pretrain_vae(pipe: Any, pairs: list[PreferencePair], steps: int, *, seed: int = 0, lr: float = 2e-3,
                 batch_size: int = 8, kl_weight: float = 1e-6, sample_posterior: bool = False) -> list[float]:
    """Train the pipeline's (random) AutoencoderKL as an autoencoder on both sides' images, then set
    its latent normalisation the way real checkpoints do; returns the per-step reconstruction MSE.

    Loss per step: MSE of ``decode(z)`` against the images in [-1, 1], plus ``kl_weight`` times the
    posterior's KL to N(0, I) (per element), as in SD's VAE training without the perceptual and GAN
    terms; ``z`` is the posterior mean, or a posterior sample with ``sample_posterior``. The tiny VAE
    (GroupNorm with one channel per group in its first block) first learns the mean image, then only
    slowly how to carry brightness: on the 96 toy pairs at batch 8, lr 2e-3, held-out reconstruction
    MSE (pixels in [0, 1]) is 0.067 untrained, 0.035 after 100 steps and 0.005 after 200 (0.008 when
    sampling the posterior), about 0.16 s a step on one CPU thread. Afterwards the posterior means of all images ``z`` set
    ``scaling_factor = 1 / std(z)`` (SD) and, for flow pipelines (SD3, Flux, whose samplers decode
    ``z / scaling + shift``), also ``shift_factor = mean(z)``, so the diffusion model sees latents
    with std 1. :class:`diffusion.adapter.DiffusionAdapter` reads these factors when it is built:
    build adapters (and caches) after this step.
    """
    vae = pipe.vae
    device = next(vae.parameters()).device
    chosen, rejected = pair_pixels(pairs)
    pixels = torch.cat([chosen, rejected]) * 2 - 1
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=g)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        if sample_posterior:
            z = z + posterior.std * torch.randn(z.shape, generator=g).to(device)
        mse = (vae.decode(z).sample - x).pow(2).mean()
        loss = mse + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(mse.item() / 4)  # in [0, 1] pixel units
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i : i + 32].to(device)).latent_dist.mean for i in range(0, len(pixels), 32)])
    if family_of(pipe).latent_shift:
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    else:
        vae.register_to_config(scaling_factor=float(1 / z.std()))
    return losses


@torch.no_grad()
def sample_latents(pipe: Any, n: int = 32, *, steps: int = 20, seed: int = 4242, batch_size: int = 16,
                   prompt: str = "a photo") -> torch.Tensor:
    """``n`` samples of ``prompt`` as the pipeline's final (scaled) latents ``(n, C, h, w)``, no VAE decode.

    Sample ``i`` starts from unit noise drawn with seed ``seed + i`` (guidance 1.0, i.e. no CFG); the
    latents are in the space of :meth:`DiffusionAdapter.encode_images` (``(z - shift) * scale``).
    """
    family = family_of(pipe)
    module = denoiser(pipe)
    was_training = module.training
    module.eval()
    side = family.default_resolution(pipe) // vae_scale_factor(pipe)
    channels = family.latent_channels(pipe)
    out = []
    try:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
            noise = torch.cat([family.to_pipeline_latents(torch.randn((1, channels, side, side), generator=g))
                               for g in gens])
            device = next(module.parameters()).device
            result = pipe(prompt=[prompt] * count, num_inference_steps=steps, guidance_scale=1.0,
                          latents=noise.to(device), generator=gens, output_type="latent")
            out.append(family.from_pipeline_latents(result.images.float().cpu(), side, side))
    finally:
        module.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """Scaled latents ``(N, C, h, w)`` -> pixels ``(N, 3, H, W)`` in [0, 1], as the pipeline decodes them
    (``z / scaling_factor``, plus ``shift_factor`` for flow pipelines; no 8-bit rounding)."""
    vae = pipe.vae
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0) if family_of(pipe).latent_shift else 0.0
    param = next(vae.parameters())
    out = [vae.decode(z.to(param) / scale + shift).sample.float().cpu()
           for z in latents.split(batch_size)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def pixel_brightness(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Per-sample mean pixel brightness ``(N,)`` in [0, 1] of decoded latents ``(N, C, h, w)``."""
    return decode_latents(pipe, latents).mean(dim=(1, 2, 3))


def brightness_score(pipe: Any, *, n: int = 32, steps: int = 20, seed: int = 4242) -> float:
    """Mean pixel brightness in [0, 1] of ``n`` fresh samples of "a photo" decoded by the pipeline's VAE
    (sample ``i`` from seed ``seed + i``: the same samples every call). Compare with
    :func:`data_brightness`; meaningful only once the VAE reconstructs (:func:`pretrain_vae`)."""
    return float(pixel_brightness(pipe, sample_latents(pipe, n, steps=steps, seed=seed)).mean())


@torch.no_grad()
def brightness_axis(adapter: DiffusionAdapter, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dark mean latent, bright mean latent)``, flattened, from the pairs' rejected/chosen images."""
    enc = adapter.collate(pairs)
    lat = adapter.encode_images(torch.cat([enc["chosen_pixel_values"], enc["rejected_pixel_values"]])).flatten(1)
    return lat[len(pairs):].mean(0), lat[: len(pairs)].mean(0)


def latent_score(latents: torch.Tensor, axis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample secondary score ``(N,)`` of latents ``(N, C, h, w)``: projection on the axis from the mean
    latent of dark images (0) to that of bright images (1) (:func:`brightness_axis`)."""
    dark, bright = axis
    direction = bright - dark
    return (latents.flatten(1).to(direction) - dark) @ direction / direction.dot(direction)
