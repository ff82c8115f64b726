"""The SD3 (flow-matching) toy: its helpers, and the adapter's sigma/timestep convention against the sampler."""

from __future__ import annotations

import pytest
import torch

from diffusion.adapter import DiffusionAdapter
from diffusion.toy import brightness_axis, brightness_pairs, latent_score, widen_transformer
from diffusion.train import load_pipeline


def test_latent_score_puts_the_dark_and_bright_means_at_0_and_1(tiny_sd3, tmp_path) -> None:
    """Means of the chosen (bright) latents score exactly 1, rejected (dark) 0: the axis is their difference."""
    pairs = brightness_pairs(tmp_path / "p", 6, seed=0, prefix="t")
    adapter = DiffusionAdapter(tiny_sd3)
    axis = brightness_axis(adapter, pairs)
    enc = adapter.collate(pairs)
    chosen = latent_score(adapter.encode_images(enc["chosen_pixel_values"]), axis)
    rejected = latent_score(adapter.encode_images(enc["rejected_pixel_values"]), axis)
    assert chosen.shape == (6,)
    assert chosen.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert rejected.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_widen_transformer_keeps_io_and_changes_width() -> None:
    pipe = load_pipeline("tiny:sd3")
    old = pipe.transformer
    wide = widen_transformer(pipe, 64, seed=0)
    assert pipe.transformer is wide and wide is not old
    assert wide.config.attention_head_dim * wide.config.num_attention_heads == 64
    assert wide.config.in_channels == old.config.in_channels and wide.config.patch_size == old.config.patch_size
    again = widen_transformer(load_pipeline("tiny:sd3"), 64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(wide.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        widen_transformer(pipe, 66)


def test_flow_targets_match_the_sampler_step(tiny_sd3) -> None:
    """Training ``timestep = 1000 sigma``; a sampler step with the exact velocity ``noise - x0`` from
    ``x_sigma = (1 - sigma) x0 + sigma noise`` lands on ``x_sigma_next`` (Euler is exact on a straight path)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = DiffusionAdapter(tiny_sd3)
    batch = adapter.prepare({"ids": list(range(64))}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch["timesteps"], 1000 * batch["sigmas"], rtol=1e-5, atol=1e-3)
    sched = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3.scheduler.config)
    sched.set_timesteps(20)
    torch.testing.assert_close(sched.timesteps, 1000 * sched.sigmas[:-1], rtol=1e-5, atol=1e-3)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    sigma, sigma_next = sched.sigmas[5], sched.sigmas[6]
    noisy, velocity = adapter.targets(x0, noise, 1000 * sigma.repeat(2), sigma.repeat(2))
    sched.set_begin_index(5)
    stepped = sched.step(velocity, sched.timesteps[5], noisy).prev_sample
    torch.testing.assert_close(stepped, (1 - sigma_next) * x0 + sigma_next * noise, rtol=1e-5, atol=1e-5)
