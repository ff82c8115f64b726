"""ReNO on FluxPipeline: the differentiable sampler equals the pipeline; reward gradients reach the noise."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffusion.adapter import pack_latents, unpack_latents
from diffusion.reno import NoiseSampler, optimize_noise
from mmalign.rewards import CallableReward

KW = {"max_sequence_length": 8}


def _redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean of R - (G + B) / 2 over the image, (B,)."""
    return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean((1, 2))


REDNESS = CallableReward(_redness, "redness")


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_matches_flux_pipeline(tiny_flux: Any, steps: int) -> None:
    """Same latent as ``pipe(..., latents=pack(z), output_type="latent")`` (packed), and the same image."""
    sampler = NoiseSampler(tiny_flux, ["a red cat"], num_inference_steps=steps, encode_kwargs=KW)
    assert sampler.kind == "flux" and sampler.latent_shape == (16, 16, 16) and (sampler.height, sampler.width) == (32, 32)
    # schnell: shift 1, no dynamic shifting -> the pipeline's sigmas linspace(1, 1/n, n) then 0
    expected = {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0]}[steps]
    torch.testing.assert_close(sampler.sigmas, torch.tensor(expected))
    z = torch.randn(1, *sampler.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sampler.latents_to_x0(z)
        ref = tiny_flux("a red cat", height=32, width=32, num_inference_steps=steps, guidance_scale=0.0,
                        latents=pack_latents(z), output_type="latent", **KW).images
        assert ref.shape == (1, 64, 64)  # 8x8 tokens of 16 channels x 2x2
        torch.testing.assert_close(pack_latents(ours), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours, unpack_latents(ref, 16, 16), atol=1e-5, rtol=1e-5)
        image = sampler(z)
        pil = tiny_flux("a red cat", height=32, width=32, num_inference_steps=steps, guidance_scale=0.0,
                        latents=pack_latents(z), output_type="pt", **KW).images
    assert image.shape == (1, 3, 32, 32)
    torch.testing.assert_close(image, pil, atol=1e-5, rtol=1e-5)


def test_dev_variant_dynamic_shift_and_guidance_match_pipeline(tiny_flux_dev: Any) -> None:
    """FLUX.1-dev class: mu from 64 packed tokens, guidance 3.5 as an embedding (2 steps)."""
    pipe = tiny_flux_dev
    sampler = NoiseSampler(pipe, ["a red cat"], num_inference_steps=2, guidance_scale=3.5, encode_kwargs=KW)
    assert sampler.guidance == 3.5 and not sampler.cfg
    z = torch.randn(1, *sampler.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipe("a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                   latents=pack_latents(z), output_type="latent", **KW).images
        torch.testing.assert_close(pack_latents(sampler.latents_to_x0(z)), ref, atol=1e-5, rtol=1e-5)
    assert 0.5 < float(sampler.sigmas[1]) < 1.0  # shifted: unshifted would be 0.5


@pytest.mark.parametrize("steps", [1, 2])
def test_reward_gradient_reaches_the_latent(tiny_flux: Any, steps: int) -> None:
    sampler = NoiseSampler(tiny_flux, ["a red cat", "a blue car"], num_inference_steps=steps, encode_kwargs=KW)
    z = torch.randn(2, *sampler.latent_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    try:
        _redness(sampler(z), ["a red cat", "a blue car"]).sum().backward()
    finally:  # the bare sampler does not freeze (optimize_noise does): the shared pipeline keeps no .grad
        for module in (tiny_flux.transformer, tiny_flux.vae):
            module.zero_grad(set_to_none=True)
    assert z.grad is not None and z.grad.shape == (2, 16, 16, 16)
    assert torch.isfinite(z.grad).all() and (z.grad.flatten(1).abs().sum(1) > 0).all()


def test_optimize_noise_raises_redness(tiny_flux: Any) -> None:
    res = optimize_noise(tiny_flux, ["a red cat", "a blue car"], REDNESS, steps=3, num_inference_steps=2,
                         encode_kwargs=KW, progress=False)
    assert res.extras["kind"] == "flux" and res.final_latents.shape == (2, 16, 16, 16)
    assert (res.best_rewards > res.initial_rewards).all(), (res.initial_rewards, res.best_rewards)
    assert res.images[0].size == (32, 32)
    assert all(p.grad is None for p in tiny_flux.transformer.parameters())  # the generator stayed frozen


def test_negative_prompt_is_an_error(tiny_flux: Any) -> None:
    with pytest.raises(ValueError, match="negative_prompt"):
        NoiseSampler(tiny_flux, ["a cat"], negative_prompt="blurry", encode_kwargs=KW)
    with pytest.raises(ValueError, match="multiples of 4"):
        NoiseSampler(tiny_flux, ["a cat"], height=30, width=32, encode_kwargs=KW)
