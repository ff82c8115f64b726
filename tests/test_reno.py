"""Tests for diffusion.reno: the differentiable sampler, the noise optimisation loop and its bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion.reno import NoiseSampler, ReNOResult, noise_norm_penalty, optimize_noise
from mmalign.rewards import CallableReward, ClipScore, WeightedRewards
from mmalign.tiny import cached_tiny

PROMPTS8 = [
    "a red apple", "a blue car", "a green field", "a cat on a mat",
    "a sunset over the sea", "a city at night", "a bowl of soup", "an old castle",
]


def _redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean of R - (G + B) / 2 over the image, (B,)."""
    return (images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean((1, 2))


REDNESS = CallableReward(_redness, "redness")


def _load(name: str, **kw: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[name]
    pipe = cls.from_pretrained(cached_tiny(name, **kw))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe() -> Any:
    return _load("sd", scheduler="euler")


# ---------------------------------------------------------------------------------------------- regulariser


def test_noise_norm_penalty_hand_value() -> None:
    """z = (1, 1, 1, 1): ||z|| = 2, d = 4: 0.5 * 4 - 3 * ln 2 = 2 - 2.0794415 = -0.0794415."""
    z = torch.ones(1, 4, dtype=torch.float16)
    out = noise_norm_penalty(z)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(2 - 3 * math.log(2), abs=1e-6)
    assert out.item() == pytest.approx(-0.0794415, abs=1e-6)


def test_noise_norm_penalty_minimum_on_the_shell() -> None:
    """Minimised at ||z|| = sqrt(d - 1): radius sqrt(3) beats 1.5 and 2.0 for d = 4; per-sample output."""
    direction = torch.ones(1, 4) / 2
    radii = torch.tensor([1.5, math.sqrt(3), 2.0]).view(3, 1)
    values = noise_norm_penalty(direction * radii)
    assert values.shape == (3,)
    assert values.argmin().item() == 1


# ---------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_matches_the_diffusers_pipeline(sd_pipe: Any, steps: int) -> None:
    """Our differentiable sampler gives the latent the (no-grad) pipeline gives from the same noise."""
    sampler = NoiseSampler(sd_pipe, ["a red cat"], num_inference_steps=steps)
    z = torch.randn(1, *sampler.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sampler.latents_to_x0(z)
        ref = sd_pipe("a red cat", num_inference_steps=steps, guidance_scale=0.0, latents=z,
                      output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


def test_sampler_sd3_flow_matches_pipeline_and_has_gradient(tiny_sd3: Any) -> None:
    pipe = tiny_sd3
    kw = {"max_sequence_length": 8}
    sampler = NoiseSampler(pipe, ["a red cat"], num_inference_steps=2, encode_kwargs=kw)
    assert sampler.kind == "sd3" and sampler.latent_shape == (16, 16, 16)
    z = torch.randn(1, *sampler.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe("a red cat", num_inference_steps=2, guidance_scale=0.0, latents=z, output_type="latent",
                   max_sequence_length=8).images
        torch.testing.assert_close(sampler.latents_to_x0(z), ref, atol=1e-4, rtol=1e-4)
    res = optimize_noise(pipe, "a red cat", REDNESS, steps=2, num_inference_steps=2, encode_kwargs=kw,
                         progress=False)
    assert not torch.equal(res.final_latents, res.initial_latents)


def test_sdxl_added_conditioning_and_gradient() -> None:
    pipe = _load("sdxl")  # its own: the backward leaves gradients in its UNet
    sampler = NoiseSampler(pipe, ["a", "b"])
    assert sampler.kind == "sdxl"
    assert sampler.cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    z = torch.randn(2, *sampler.latent_shape, requires_grad=True)
    _redness(sampler(z), ["a", "b"]).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_pixart_class_matches_pipeline(tiny_sd: Any, steps: int) -> None:
    """PixArt-class: transformer with learned-sigma output halves, attention mask, DDIM. Text encoding is
    stubbed (a T5 would need sentencepiece files); the pipeline then runs from the same prompt_embeds.
    Our x_T is sqrt(1 - abar_999) * z, so the pipeline (init_noise_sigma 1) is given that latent."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=32, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    vae = tiny_sd.vae  # frozen, only read (optimize_noise restores what it freezes)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    embeds, mask = torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.long)

    def stub(**kw: Any) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        n = len(kw["prompt"])
        return embeds.repeat(n, 1, 1), mask.repeat(n, 1), None, None

    pipe.encode_prompt = stub
    sampler = NoiseSampler(pipe, ["a"], num_inference_steps=steps)
    assert sampler.kind == "pixart"
    z = torch.randn(1, *sampler.latent_shape)
    del pipe.encode_prompt
    with torch.no_grad():
        ours = sampler.latents_to_x0(z)
        ref = pipe(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=1.0,
                   num_inference_steps=steps, latents=z * sampler.sigmas_vp[0], output_type="latent",
                   use_resolution_binning=False).images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    pipe.encode_prompt = stub
    res = optimize_noise(pipe, ["a", "b"], REDNESS, steps=2, num_inference_steps=steps, progress=False)
    assert not torch.equal(res.final_latents, res.initial_latents)


# ---------------------------------------------------------------------------------------------- toy evidence


def test_redness_rises_on_every_prompt(sd_pipe: Any) -> None:
    """Toy evidence at 16x16 px, 8 prompts, 11 iterations = 10 updates (the 8 x 50 run at 32x32 is in
    benchmarks/reno.py)."""
    res = optimize_noise(sd_pipe, PROMPTS8, REDNESS, steps=11, height=16, width=16, progress=False)
    assert isinstance(res, ReNOResult)
    assert res.rewards.shape == (11, 8) and res.reward_scores["redness"].shape == (11, 8)
    assert (res.best_rewards > res.initial_rewards).all(), (res.initial_rewards, res.best_rewards)
    assert (res.rewards[-1] > res.rewards[0]).all()
    # the kept image is the best one seen, and it is the image its latent makes
    rows = res.rewards[res.best_iteration, torch.arange(8)]
    torch.testing.assert_close(rows, res.best_rewards)
    torch.testing.assert_close(res.best_rewards, _redness(res.image_tensors, PROMPTS8), atol=1e-5, rtol=1e-4)
    assert len(res.images) == 8 and res.images[0].size == (16, 16)
    assert res.iteration_times.shape == (10,) and (res.iteration_times > 0).all()
    assert res.nan_skipped.tolist() == [0] * 8


def test_generator_is_frozen_and_restored(sd_pipe: Any) -> None:
    sd_pipe.unet.train()
    before = [p.requires_grad for p in sd_pipe.unet.parameters()]
    res = optimize_noise(sd_pipe, "a red apple", REDNESS, steps=2, height=16, width=16, progress=False,
                         gradient_checkpointing=True, vae_checkpointing=True)
    assert all(p.grad is None for p in sd_pipe.unet.parameters())
    assert all(p.grad is None for p in sd_pipe.vae.parameters())
    assert [p.requires_grad for p in sd_pipe.unet.parameters()] == before
    assert sd_pipe.unet.training and not sd_pipe.unet.is_gradient_checkpointing
    assert not sd_pipe.vae.is_gradient_checkpointing
    sd_pipe.unet.eval()
    assert res.final_latents.shape == (1, 4, 8, 8)


def test_checkpointing_gives_the_same_updates(sd_pipe: Any) -> None:
    kw = dict(steps=3, height=16, width=16, progress=False)
    plain = optimize_noise(sd_pipe, ["a red apple"], REDNESS, **kw)
    ckpt = optimize_noise(sd_pipe, ["a red apple"], REDNESS, gradient_checkpointing=True, vae_checkpointing=True,
                          **kw)
    torch.testing.assert_close(ckpt.final_latents, plain.final_latents, atol=1e-5, rtol=1e-5)
    # a denoiser without diffusers' per-block switch is checkpointed as a whole
    sd_pipe.unet._supports_gradient_checkpointing = False
    try:
        sampler = NoiseSampler(sd_pipe, ["a red apple"], height=16, width=16, gradient_checkpointing=True)
        assert sampler.denoiser_whole and not sampler.denoiser_per_block
        whole = optimize_noise(sd_pipe, ["a red apple"], REDNESS, gradient_checkpointing=True, **kw)
    finally:
        del sd_pipe.unet._supports_gradient_checkpointing
    assert not sd_pipe.unet.is_gradient_checkpointing
    torch.testing.assert_close(whole.final_latents, plain.final_latents, atol=1e-5, rtol=1e-5)


def test_batch_equals_prompts_one_by_one(sd_pipe: Any) -> None:
    """Per-prompt seeds (seed + i), per-prompt gradient clipping: a batch of 2 equals two single runs."""
    kw = dict(steps=3, height=16, width=16, progress=False)
    both = optimize_noise(sd_pipe, ["a red apple", "a blue car"], REDNESS, **kw)
    first = optimize_noise(sd_pipe, ["a red apple"], REDNESS, seed=0, **kw)
    second = optimize_noise(sd_pipe, ["a blue car"], REDNESS, seed=1, **kw)
    torch.testing.assert_close(both.final_latents[0], first.final_latents[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both.final_latents[1], second.final_latents[0], atol=1e-4, rtol=1e-4)


def test_update_size_is_clipped(sd_pipe: Any) -> None:
    """First SGD step with empty momentum: Nesterov update = lr * (g + 0.9 g) = 1.9 * lr * g, and
    ||g|| = 0.1 after clipping (the gradient of 1000 * redness is about 6), so ||dz|| = 1.9 * 5 * 0.1 = 0.95."""
    strong = CallableReward(lambda images, prompts: 1000 * _redness(images, prompts), "redness1000")
    res = optimize_noise(sd_pipe, "a red apple", strong, steps=2, reg_weight=0.0, height=16, width=16,
                         progress=False)
    assert res.extras["kind"] == "sd"
    step = (res.final_latents - res.initial_latents).flatten().norm().item()
    assert step == pytest.approx(0.95, rel=1e-3)


# ---------------------------------------------------------------------------------------------- tiny CLIP reward


def test_clip_reward_gradient_reaches_the_latent(sd_pipe: Any) -> None:
    pytest.importorskip("open_clip")
    clip = ClipScore(pretrained=cached_tiny("open_clip"), weight=1.0)
    sampler = NoiseSampler(sd_pipe, ["a red apple", "a blue car"], height=16, width=16)
    z = torch.randn(2, *sampler.latent_shape, requires_grad=True)
    clip.loss(sampler(z), ["a red apple", "a blue car"]).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert (z.grad.flatten(1).norm(dim=1) > 0).all()
    res = optimize_noise(sd_pipe, ["a red apple", "a blue car"], [(clip, 1.0), (REDNESS, 10.0)], steps=3,
                         height=16, width=16, progress=False)
    assert set(res.reward_scores) == {"clip", "redness"}
    total = -(1.0 * (100 - res.reward_scores["clip"]) + 10.0 * -res.reward_scores["redness"])
    torch.testing.assert_close(res.rewards, total, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected(sd_pipe: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward list is empty"):
        optimize_noise(sd_pipe, "a cat", [], steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        optimize_noise(sd_pipe, ["a cat", "  "], REDNESS, steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt list is empty"):
        optimize_noise(sd_pipe, [], REDNESS, steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="clip_weights.safetensors"):
        optimize_noise(sd_pipe, "a cat", ClipScore("ViT-B-32", tmp_path / "clip_weights.safetensors"))
    with pytest.raises(ValueError, match="multiples of 2"):
        optimize_noise(sd_pipe, "a cat", REDNESS, height=17, width=16, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        optimize_noise(sd_pipe, "a cat", REDNESS, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        optimize_noise(sd_pipe, "a cat", REDNESS, steps=0, progress=False)


def test_pipeline_without_latents_is_rejected() -> None:
    class TextOnly:
        def __call__(self, prompt: str) -> str:
            return prompt

    with pytest.raises(ValueError, match=r"TextOnly cannot take latents: it lacks unet or transformer, vae"):
        optimize_noise(TextOnly(), "a cat", REDNESS, progress=False)


def test_nan_gradient_skips_the_update_for_that_prompt_only(sd_pipe: Any) -> None:
    """The reward of prompt 0 turns NaN on its 2nd call (iteration 1): that update is skipped for prompt 0
    (counted once, latent and momentum restored, so iteration 2 redraws the iteration-1 image), prompt 1
    goes on, and the NaN never becomes the best."""
    calls = {"n": 0}

    def flaky(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        calls["n"] += 1
        score = _redness(images, prompts)
        if calls["n"] == 2:
            score = score * torch.tensor([math.nan, 1.0])
        return score

    res = optimize_noise(sd_pipe, ["a red apple", "a blue car"], CallableReward(flaky, "flaky"), steps=4,
                         height=16, width=16, progress=False)
    assert res.nan_skipped.tolist() == [1, 0]
    assert math.isnan(res.rewards[1, 0].item()) and torch.isfinite(res.rewards[:, 1]).all()
    assert res.best_iteration[0].item() != 1 and torch.isfinite(res.best_rewards).all()
    # prompt 0 made updates at iterations 0 and 2 only: the same two updates as a clean 2-step run
    clean = optimize_noise(sd_pipe, ["a red apple", "a blue car"], REDNESS, steps=3, height=16, width=16,
                           progress=False)
    assert res.rewards[2, 0].item() == pytest.approx(clean.rewards[1, 0].item(), rel=1e-5)
    torch.testing.assert_close(res.final_latents[0], clean.final_latents[0], atol=1e-5, rtol=1e-5)


def test_weighted_rewards_object_is_accepted(sd_pipe: Any) -> None:
    res = optimize_noise(sd_pipe, "a red apple", WeightedRewards([(REDNESS, 2.0)]), steps=1, height=16,
                         width=16, progress=False)
    assert res.rewards.shape == (1, 1) and res.iteration_times.numel() == 0
    torch.testing.assert_close(res.rewards[0], 2.0 * res.reward_scores["redness"][0])


def test_save_report_writes_pairs_plot_and_json(sd_pipe: Any, tmp_path: Path) -> None:
    from diffusion.reno import save_report

    res = optimize_noise(sd_pipe, ["a red apple", "a blue car"], REDNESS, steps=2, height=16, width=16,
                         progress=False)
    paths = save_report(res, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["000_a_red_apple.png", "001_a_blue_car.png", "rewards.json", "rewards.png"]
    from PIL import Image

    assert Image.open(tmp_path / "000_a_red_apple.png").size == (32, 16)
    summary = json.loads((tmp_path / "rewards.json").read_text())
    assert summary["best_rewards"] == pytest.approx(res.best_rewards.tolist())


# ---------------------------------------------------------------------------------------------- ReNO parity
# Reference: ExplainableML/ReNO @bd6f6acf (training/trainer.py, training/optim.py, models/utils.py).


def test_steps_scores_that_many_images_and_updates_one_less(sd_pipe: Any) -> None:
    """ReNO's ``n_iters`` (trainer.py): every iteration scores an image; all but the last then step the
    optimizer, so n_iters=50 is 49 updates and 50 images. steps=4: 3 scorings with gradient (each
    followed by an update) and 1 final scoring without."""
    calls = {"grad": 0, "no_grad": 0}

    def counting(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        calls["grad" if images.requires_grad else "no_grad"] += 1
        return _redness(images, prompts)

    res = optimize_noise(sd_pipe, "a red apple", CallableReward(counting, "counting"), steps=4, height=16,
                         width=16, progress=False)
    assert calls == {"grad": 3, "no_grad": 1}
    assert res.rewards.shape == (4, 1) and res.iteration_times.shape == (3,)
    one = optimize_noise(sd_pipe, "a red apple", REDNESS, steps=1, height=16, width=16, progress=False)
    assert one.rewards.shape == (1, 1) and torch.equal(one.final_latents, one.initial_latents)


def test_adam_uses_renos_eps(sd_pipe: Any) -> None:
    """ReNO's Adam (optim.py): ``torch.optim.Adam([latents], lr=lr, eps=1e-2)``. Adam's first step is
    ``dz = -lr * g / (|g| + eps)`` (m_hat = g, sqrt(v_hat) = |g|), g the gradient after clipping to norm 0.1.
    Spread over d = 4*8*8 = 256 elements, |g_i| is about 0.1/16 = 0.006, so eps 1e-2 moves an element by
    about 5 * 0.006 / 0.016 = 2 instead of the full lr 5 that eps 1e-8 gives every element."""
    res = optimize_noise(sd_pipe, "a red apple", REDNESS, steps=2, optimizer="adam", reg_weight=0.0, height=16,
                         width=16, progress=False)
    sampler = NoiseSampler(sd_pipe, ["a red apple"], height=16, width=16)
    z = res.initial_latents.clone().requires_grad_(True)
    (-_redness(sampler(z), ["a red apple"])).sum().backward()
    assert z.grad is not None
    g = z.grad * min(1.0, 0.1 / (z.grad.norm().item() + 1e-6))
    expected = -5.0 * g / (g.abs() + 1e-2)
    step = res.final_latents - res.initial_latents
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-3)
    assert step.abs().mean().item() < 3.0


def test_a_plain_function_is_a_reward(sd_pipe: Any) -> None:
    """``rewards=fn`` with ``fn(images, prompts) -> (B,)`` is wrapped (loss = -score)."""
    res = optimize_noise(sd_pipe, "a red apple", _redness, steps=2, height=16, width=16, progress=False)
    assert set(res.reward_scores) == {"_redness"}
    torch.testing.assert_close(res.rewards, res.reward_scores["_redness"])


def test_ancestral_sampler_matches_the_pipeline(tiny_sd_euler_ancestral: Any) -> None:
    """ReNO samples 2-4 step SDXL-Turbo with EulerAncestralDiscreteScheduler (models/utils.py), reseeding its
    generator every iteration, so the added noise is the same for every iteration. Ours: prompt i's CPU
    generator (seed + i) draws the initial noise, then one ancestral noise per step, once. Given that
    generator after the initial noise, the diffusers pipeline makes the same latent."""
    pipe = tiny_sd_euler_ancestral
    sampler = NoiseSampler(pipe, ["a red cat"], num_inference_steps=2, seed=7)
    assert sampler.ancestral  # followed the pipeline's scheduler
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, *sampler.latent_shape, generator=g)
    torch.testing.assert_close(sampler.initial_noise, z)
    with torch.no_grad():
        ours = sampler.latents_to_x0(z)
        ref = pipe("a red cat", num_inference_steps=2, guidance_scale=0.0, latents=z, generator=g,
                   output_type="latent").images
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sampler.latents_to_x0(z), ours)  # fixed noise: a function of z
        plain = NoiseSampler(pipe, ["a red cat"], num_inference_steps=2, seed=7, ancestral=False)
        assert (plain.latents_to_x0(z) - ours).abs().max().item() > 1e-3
        other = NoiseSampler(pipe, ["a red cat"], num_inference_steps=2, seed=8)
        assert (other.latents_to_x0(z) - ours).abs().max().item() > 1e-3
        one = NoiseSampler(pipe, ["a red cat"], num_inference_steps=1, seed=7)  # last step adds no noise
        one_plain = NoiseSampler(pipe, ["a red cat"], num_inference_steps=1, seed=7, ancestral=False)
        torch.testing.assert_close(one.latents_to_x0(z), one_plain.latents_to_x0(z), atol=1e-4, rtol=1e-4)


def test_ancestral_sdxl_runs_repeat() -> None:
    """SDXL(-Turbo) with ReNO's EulerAncestral scheduler, 2 steps: the same seed gives the same run."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = _load("sdxl")  # its own: its scheduler is swapped
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    kw = dict(steps=3, num_inference_steps=2, height=16, width=16, progress=False)
    first = optimize_noise(pipe, "a red apple", REDNESS, **kw)
    again = optimize_noise(pipe, "a red apple", REDNESS, **kw)
    assert first.extras["ancestral"] is True
    torch.testing.assert_close(first.final_latents, again.final_latents)
    torch.testing.assert_close(first.rewards, again.rewards)
    assert not torch.equal(first.final_latents, first.initial_latents)


def test_ancestral_needs_a_variance_preserving_scheduler(tiny_sd3: Any) -> None:
    with pytest.raises(ValueError, match="ancestral"):
        NoiseSampler(tiny_sd3, ["a"], ancestral=True, encode_kwargs={"max_sequence_length": 8})
