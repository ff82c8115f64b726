"""``benchmarks.cuda``: the CUDA benchmark's code paths with tiny configs on the CPU (``--tiny``);
the real sizes run only on a CUDA machine (``scripts/device_check.sh``)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from benchmarks import cuda as bench_cuda


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _args(*extra: str) -> argparse.Namespace:
    return argparse.Namespace(**bench_cuda.DEFAULTS, extra=list(extra))


def test_tiny_run_has_every_figure(tmp_path):
    """All three parts in-process with tiny configs: keys present, times finite and positive, no errors."""
    out = tmp_path / "cuda.json"
    figures = bench_cuda.bench_cuda(_args("--tiny", "--no-isolate", "--json", str(out)))
    assert json.loads(out.read_text())["tiny"] is True  # the partial-results file is the final one
    assert "error" not in json.dumps(figures), json.dumps(figures, indent=1)
    diffusion = figures["diffusion"]
    for attention in ("sdpa", "xformers"):
        runs = diffusion[attention]["128"]
        assert runs["latents"] == "4x16x16"
        for name in ("dpo_frozen", "mapo"):
            assert _finite(runs[name]["seconds_per_step"]) and runs[name]["seconds_per_step"] > 0
            assert len(runs[name]["step_seconds"]) == bench_cuda.TINY["timed"]
            assert runs[name]["peak_bytes"] is None  # CPU: no CUDA allocator to read
        assert _finite(runs["time_ratio_mapo_vs_dpo"])
        assert runs["attention_used"] == "sdpa"  # CPU: xformers falls back, and says so
    assert "xformers_note" in diffusion
    reno = figures["reno"]
    assert reno["time"]["iterations"] == bench_cuda.TINY["reno_iters"]
    assert _finite(reno["time"]["seconds_per_prompt"]) and reno["time"]["seconds_per_prompt"] > 0
    assert _finite(reno["time"]["best_reward"]) and reno["time"]["best_reward"] >= reno["time"]["initial_reward"]
    assert set(reno["memory"]) >= {"off", "on", "ratio_on_to_off"}
    llava = figures["llava"]
    assert llava["setup"]["image_tokens"] == 16
    for reference in ("frozen", "precomputed", "lora_disabled"):
        assert _finite(llava[reference]["seconds_per_step"]) and llava[reference]["seconds_per_step"] > 0


def test_real_configs_have_the_published_sizes():
    """Parameter counts on the meta device: SDXL UNet 2.567B, SD2.1 UNet 866M, SD VAE 83.7M,
    OpenCLIP-H text (23 layers) 340M, LLaVA-1.5-7B 7.06B (Llama-2-7B 6.74B + CLIP-L/336 0.30B + projector)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlavaForConditionalGeneration

    def count(m: torch.nn.Module) -> float:
        return sum(p.numel() for p in m.parameters())

    turbo = bench_cuda.sd_turbo_configs(False)
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**bench_cuda.sdxl_unet_config(False))) == pytest.approx(2.567e9, rel=1e-3)
        assert count(UNet2DConditionModel(**turbo["unet"])) == pytest.approx(865.9e6, rel=1e-3)
        assert count(AutoencoderKL(**turbo["vae"])) == pytest.approx(83.65e6, rel=1e-3)
        assert count(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **turbo["text"]))) == pytest.approx(340.4e6, rel=1e-3)
        llava = LlavaForConditionalGeneration(bench_cuda.llava_config(False, vocab_size=300, image_token_id=5,
                                                                      pad_token_id=0))
        assert count(llava) == pytest.approx(7.063e9, rel=1e-3)


def test_without_cuda_the_real_run_is_skipped_not_crashed():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert "skipped" in bench_cuda.bench_cuda(_args())


def test_bad_part_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown part 'vae'"):
        bench_cuda.bench_cuda(_args("--tiny", "--part", "vae"))

