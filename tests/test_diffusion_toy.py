"""The brightness toy's VAE pretraining and pixel-brightness score (diffusion.toy)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.toy import (
    brightness_pairs,
    brightness_score,
    data_brightness,
    decode_latents,
    pair_pixels,
    pixel_brightness,
    pretrain_vae,
    reconstruction_error,
    sample_latents,
)
from diffusion.train import load_pipeline

#: the tiny VAE passes its mean-image plateau (MSE ~0.035) only after ~150 steps (see pretrain_vae)
VAE_STEPS = 200
TRAIN_PAIRS, HELD_PAIRS = 24, 8


def _pretrained_vae_key(tiny_sd: Path) -> str:
    """What the pretrained pipeline depends on: the settings, the base pipeline (its cache folder name
    digests the builder), the source of the functions that make the data and train, and the library versions."""
    import inspect

    import diffusers

    import diffusion.toy

    digest = hashlib.sha256()
    settings = {"steps": VAE_STEPS, "train": TRAIN_PAIRS, "held": HELD_PAIRS, "seed": 0, "base": tiny_sd.name,
                "versions": [torch.__version__, diffusers.__version__]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in ("pattern", "brightness_pairs", "pair_pixels", "reconstruction_error", "pretrain_vae"):
        digest.update(inspect.getsource(getattr(diffusion.toy, name)).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def toy(tmp_path_factory, request, tiny_sd_path):
    """Training and held-out pairs, and a tiny SD pipeline before and after ``pretrain_vae``.

    The pretraining (~130 s of CPU) runs once: its pipeline, losses and starting error are kept under the
    pytest cache folder, keyed by :func:`_pretrained_vae_key`, so later sessions load them (``-p
    no:cacheprovider`` or a changed key trains again)."""
    root = tmp_path_factory.mktemp("toy")
    train = brightness_pairs(root / "train", TRAIN_PAIRS, seed=0, prefix="t")
    held = brightness_pairs(root / "held", HELD_PAIRS, seed=1, prefix="h")
    cache = getattr(request.config, "cache", None)
    final = None
    if cache is not None:
        final = Path(cache.mkdir("diffusion_toy_vae")) / _pretrained_vae_key(tiny_sd_path)
        if (final / "result.json").is_file():
            result = json.loads((final / "result.json").read_text())
            return {"train": train, "held": held, "pipe": load_pipeline(str(final / "pipeline")), **result}
    pipe = load_pipeline(str(tiny_sd_path))
    held_pixels = torch.cat(pair_pixels(held))
    result = {"error_before": reconstruction_error(pipe.vae, held_pixels)}
    result["losses"] = pretrain_vae(pipe, train, VAE_STEPS, seed=0)
    if final is not None:
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
            (staging / "result.json").write_text(json.dumps(result))
            with contextlib.suppress(OSError):  # another session stored the same result first
                os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"train": train, "held": held, "pipe": pipe, **result}


def test_data_brightness_orders_the_sides(tmp_path) -> None:
    """brightness_pairs draws rejected ~ U(0.15, 0.55) and chosen = rejected + U(0.2, 0.3) (before clipping)."""
    pairs = brightness_pairs(tmp_path / "p", 24, seed=0, prefix="t")
    chosen, rejected = data_brightness(pairs)
    assert 0.15 < rejected < 0.55 and 0.15 < chosen - rejected < 0.35
    pixels_chosen, _ = pair_pixels(pairs[:1])
    assert pixels_chosen.shape == (1, 3, 32, 32) and 0 <= pixels_chosen.min() and pixels_chosen.max() <= 1


@pytest.mark.slow  # shares the session's VAE pretraining (~130 s CPU; cached across sessions)
def test_pretrain_vae_reconstructs_held_out_images_and_normalises_latents(toy) -> None:
    pipe, held = toy["pipe"], toy["held"]
    held_pixels = torch.cat(pair_pixels(held))
    error_after = reconstruction_error(pipe.vae, held_pixels)
    assert len(toy["losses"]) == VAE_STEPS
    assert error_after < toy["error_before"] / 5, (toy["error_before"], error_after)
    # scaling_factor = 1 / std of the training latents, so held-out latents have std ~1
    latents = DiffusionAdapter(pipe).encode_images(held_pixels * 2 - 1)
    assert 0.8 < latents.std().item() < 1.25
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)


@pytest.mark.slow  # shares the session's VAE pretraining (~130 s CPU; cached across sessions)
def test_pixel_brightness_of_data_latents_tracks_real_brightness(toy) -> None:
    """Decoding the latents of bright and dark held-out images gives their brightness back, ordered
    (the true means lie between 0.15 and 0.85, so an error of 0.04 is small against that spread)."""
    pipe = toy["pipe"]
    chosen, rejected = pair_pixels(toy["held"])
    adapter = DiffusionAdapter(pipe)
    bright = pixel_brightness(pipe, adapter.encode_images(chosen * 2 - 1))
    dark = pixel_brightness(pipe, adapter.encode_images(rejected * 2 - 1))
    assert bright.shape == (8,)
    assert (bright > dark).all()
    decoded, real = torch.cat([bright, dark]), torch.cat([chosen, rejected]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(decoded, real, atol=0.1, rtol=0)  # each image within 0.1 (24 training pairs only)
    assert (decoded - real).abs().mean() < 0.04


@pytest.mark.slow  # shares the session's VAE pretraining (~130 s CPU; cached across sessions)
def test_brightness_score_is_the_mean_pixel_brightness_of_the_pipelines_samples(toy) -> None:
    """Same seeds every call; equal to what the pipeline itself decodes (output_type="pt")."""
    pipe = toy["pipe"]
    score = brightness_score(pipe, n=2, steps=2)
    assert score == brightness_score(pipe, n=2, steps=2)
    gens = [torch.Generator().manual_seed(4242 + i) for i in range(2)]
    noise = torch.cat([torch.randn((1, 4, 16, 16), generator=g) for g in gens])
    images = pipe(prompt=["a photo"] * 2, num_inference_steps=2, guidance_scale=1.0, latents=noise, generator=gens,
                  output_type="pt").images
    assert 0 <= score <= 1
    assert score == pytest.approx(images.mean().item(), abs=1e-4)


def test_flow_pipelines_get_a_shift_and_decode_with_it(tmp_path) -> None:
    """SD3's sampler decodes ``z / scaling + shift``: pretrain_vae sets both, decode_latents applies both."""
    pairs = brightness_pairs(tmp_path / "p", 8, seed=0, prefix="t")
    pipe = load_pipeline("tiny:sd3")
    pretrain_vae(pipe, pairs, 2, seed=0)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    assert shift != pytest.approx(0.0609) and scale != pytest.approx(1.5305)
    latents = DiffusionAdapter(pipe).encode_images(torch.cat(pair_pixels(pairs)) * 2 - 1)
    assert abs(latents.mean().item()) < 1e-3 and latents.std().item() == pytest.approx(1.0, abs=1e-3)
    z = sample_latents(pipe, 1, steps=1)
    expected = (pipe.vae.decode(z / scale + shift).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decode_latents(pipe, z), expected)
