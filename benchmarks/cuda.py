"""CUDA benchmark section (``python scripts/bench.py cuda``): the GPU figures of the diffusion, ReNO and
VLM goals, at real model sizes with random weights (no hub access needed).

Parts (each measurement in its own try/except: one OOM or error is recorded as a string and the
others still run; by default each part runs in its own subprocess, so a hard crash loses one part):

* ``diffusion``: Diffusion-DPO with the engine's frozen reference vs MaPO, full
  fine-tuning through ``mmalign.engine.train`` + ``DiffusionAdapter``, of a randomly initialised
  SDXL-sized ``UNet2DConditionModel`` (2.57B params; fp32 master weights, ``mixed_precision="bf16"``,
  gradient checkpointing, AdamW), 1 pair per step, 1024 px (128x128 latents), falling back to 768
  and 512 px on OOM; with SDPA and with xformers. The scheduler comes from the tiny SDXL pipeline;
  latents, text embeddings (77x2048), pooled embeddings (1280) and size conditioning come from an
  in-memory cache of random tensors of SDXL's shapes (caches on, as in the CPU benchmark), so no VAE
  or text encoder runs.
* ``reno``: ``diffusion.reno.optimize_noise`` on a randomly initialised SD-Turbo-sized
  pipeline (SD2.1 UNet, SD VAE, OpenCLIP-H-sized CLIP text encoder; bf16 weights; Euler, trailing
  spacing, one step) at 512 px: seconds per prompt for 50 iterations (after a warm-up call), and
  peak memory of a few iterations with both checkpointing options off vs on. Reward: mean redness
  plus a random small CNN (no reward weights exist there).
* ``llava``: one engine DPO step of a LLaVA-1.5-7B-shaped
  ``LlavaForConditionalGeneration`` (Llama-2-7B text model, CLIP ViT-L/14-336 vision tower; bf16
  weights, LoRA r=16, gradient checkpointing) through ``VLMAdapter``, 1 pair per step (576 image
  tokens + prompt + ~256 response tokens a row), with a frozen, a precomputed and a LoRA-disabled
  reference. A run that would not fit in free GPU memory is reported, not attempted.

Timing: ``warmup`` optimizer steps, then ``timed`` steps; seconds per step are the median of the
step-to-step times taken by an engine callback (after ``torch.cuda.synchronize``). The callback
stops the run after the last timed step, so no final checkpoint (30 GB for SDXL) is written.
Memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated before the model was built (so it counts weights, the frozen copy, gradients, optimizer
state and activations); ``None`` on the CPU.

``--tiny`` runs every code path with tiny configs on the CPU (the test does this); without CUDA and
without ``--tiny`` the section reports that it was skipped. Options after the section name:
``--tiny``, ``--part diffusion,reno,llava``, ``--json PATH`` (partial results written after every
measurement), ``--no-isolate``, ``--budget SECONDS``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["DEFAULTS", "PARTS", "TINY", "bench_cuda", "llava_config", "sd_turbo_configs", "sdxl_unet_config"]

DEFAULTS: dict[str, Any] = {
    "tiny": False,
    "part": "diffusion,reno,llava",
    "warmup": 2,
    "timed": 5,
    "resolutions": "1024,768,512",
    "attention": "sdpa,xformers",
    "reno_iters": 50,
    "reno_size": 512,
    "reno_mem_iters": 3,
    "llava_response_tokens": 256,
    "llava_references": "frozen,precomputed,lora_disabled",
    "lora_r": 16,
    "isolate": True,
    "json": "",
    "budget": 480.0,
    "threads": 1,
}

#: what ``--tiny`` changes (tiny configs at their native sizes, short rows, few iterations)
TINY: dict[str, Any] = {"resolutions": "128", "reno_size": 32, "reno_iters": 3, "reno_mem_iters": 2,
                        "llava_response_tokens": 16, "lora_r": 4, "warmup": 1, "timed": 2}

Record = Callable[[str, Any], None]


class _Done(Exception):
    """Raised by the timing callback after the last timed step (skips the final checkpoint)."""


# ----------------------------------------------------------------------------------------- configs


def sdxl_unet_config(tiny: bool) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs: SDXL base 1.0's UNet, or the tiny SDXL-shaped one of ``mmalign.tiny``.

    SDXL: blocks (320, 640, 1280), transformer layers (1, 2, 10), head dims (5, 10, 20), cross-attention
    2048 (CLIP-L 768 + OpenCLIP-bigG 1280), ``text_time`` conditioning with time embed 256, so
    ``projection_class_embeddings_input_dim = 6 * 256 + 1280 = 2816``.
    """
    if tiny:
        return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                    attention_head_dim=(2, 4), transformer_layers_per_block=1, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32)
    return dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                act_fn="silu", flip_sin_to_cos=True, freq_shift=0)


def sd_turbo_configs(tiny: bool) -> dict[str, dict[str, Any]]:
    """Kwargs of the UNet, VAE and CLIP text encoder: SD-Turbo (= SD2.1 shapes) or tiny ones.

    SD2.1 UNet: blocks (320, 640, 1280, 1280), head dims (5, 10, 20, 20), cross-attention 1024, linear
    projections. VAE: blocks (128, 256, 512, 512), 4 latent channels, scaling 0.18215. Text encoder:
    OpenCLIP ViT-H/14's text tower as a ``CLIPTextModel`` (width 1024, 23 layers used by SD2, 16 heads).
    """
    if tiny:
        unet = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=(2, 4), norm_num_groups=32)
        vae = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, projection_dim=32)
    else:
        unet = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    max_position_embeddings=77, projection_dim=512, hidden_act="gelu")
    vae.update(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
               sample_size=unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))
    return {"unet": unet, "vae": vae, "text": text}


def llava_config(tiny: bool, *, vocab_size: int, image_token_id: int, pad_token_id: int) -> Any:
    """A ``LlavaConfig``: LLaVA-1.5-7B's shapes (Llama-2-7B + CLIP ViT-L/14-336, 576 image tokens) or tiny."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=32)
        text = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                           pad_token_id=pad_token_id)
        layer, tokens = -1, 16
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=max(vocab_size, 32064), hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=pad_token_id)
        layer, tokens = -2, 576
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=layer, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=tokens)


# ----------------------------------------------------------------------------------------- helpers


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sync(device: torch.device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if _cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _mark(device: torch.device) -> int | None:
    """Reset the peak counter; the bytes allocated now (None on the CPU)."""
    _cleanup(device)
    if not _cuda(device):
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, base: int | None) -> int | None:
    return None if base is None else torch.cuda.max_memory_allocated(device) - base


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _error(exc: BaseException) -> str:
    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    where = traceback.extract_tb(exc.__traceback__)[-3:]
    trail = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where))
    return f"{kind}: {str(exc).splitlines()[0][:400] if str(exc) else ''} [{trail}]"


def _engine_run(build: Callable[[], torch.nn.Module], adapter: Any, pairs: list[Any], o: dict[str, Any],
                device: torch.device, out_dir: Path, **cfg: Any) -> dict[str, Any]:
    """Build the model, train ``warmup + timed`` steps through the engine; step seconds and peak memory."""
    from mmalign.engine import TrainConfig, train

    base = _mark(device)
    model = build()
    weights = None if base is None else torch.cuda.memory_allocated(device) - base
    total = o["warmup"] + o["timed"]
    stamps: list[float] = []

    def callback(info: Any) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if info.step >= total:
            raise _Done

    config = TrainConfig(output_dir=str(out_dir), max_steps=total, batch_size=1, learning_rate=1e-6,
                         trackers=[], progress=False, plot=False, save_every=0, **cfg)
    t0 = time.perf_counter()
    try:
        train(model, adapter, pairs, config, callbacks=[callback])
    except _Done:
        pass
    peak = _peak_since(device, base)
    del model
    _cleanup(device)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][o["warmup"] - 1:]
    if len(steps) < o["timed"]:
        raise RuntimeError(f"only {len(stamps)} optimizer steps ran, expected {total}")
    return {"seconds_per_step": statistics.median(steps), "step_seconds": [round(s, 4) for s in steps],
            "setup_and_warmup_seconds": round(stamps[o["warmup"] - 1] - t0, 2),
            "weights_GiB": _gib(weights), "peak_GiB": _gib(peak), "peak_bytes": peak}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


# ----------------------------------------------------------------------------------------- diffusion


class _RandomCache:
    """Stands in for ``diffusion.cache.LatentCache``: random tensors of the UNet's shapes, one set per pair."""

    def __init__(self, latent_side: int, text_dim: int, pooled_dim: int, resolution: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.row = {}
        for side in ("chosen", "rejected"):
            self.row[f"{side}_latents"] = torch.randn(4, latent_side, latent_side, generator=g)
            self.row[f"{side}_prompt_embeds"] = torch.randn(77, text_dim, generator=g)
            self.row[f"{side}_pooled_embeds"] = torch.randn(pooled_dim, generator=g)
            self.row[f"{side}_time_ids"] = torch.tensor([resolution, resolution, 0, 0, resolution, resolution],
                                                        dtype=torch.float32)
        self.empty = {"prompt_embeds": torch.zeros(1, 77, text_dim), "pooled_embeds": torch.zeros(1, pooled_dim)}

    def load_pair(self, pair_id: str, *, flipped: bool = False) -> dict[str, torch.Tensor]:
        if flipped:
            raise ValueError("the benchmark's random cache holds no mirrored latents (random_flip is off here)")
        return dict(self.row)

    def load_empty(self) -> dict[str, torch.Tensor]:
        return dict(self.empty)


def part_diffusion(o: dict[str, Any], device: torch.device, record: Record, tmp: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from diffusion.adapter import DiffusionAdapter
    from mmalign.attention import set_attention_backend
    from mmalign.pairs import PreferencePair
    from mmalign.tiny import cached_tiny

    cfg = sdxl_unet_config(o["tiny"])
    pipe = StableDiffusionXLPipeline.from_pretrained(cached_tiny("sdxl"))  # scheduler only
    pairs = [PreferencePair(id=f"p{i}", prompt="synthetic", chosen="", rejected="", chosen_media=["chosen.png"],
                            rejected_media=["rejected.png"])  # never read: the cache serves the latents
             for i in range(o["warmup"] + o["timed"])]
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    resolutions = [int(r) for r in str(o["resolutions"]).split(",")]
    record("setup", (f"{'tiny' if o['tiny'] else 'SDXL-sized'} UNet2DConditionModel, random init, full fine-tuning, "
                     "fp32 weights + bf16 autocast (engine mixed_precision='bf16'), gradient checkpointing, AdamW, "
                     "max_grad_norm 1.0, 1 pair/step, latents/text from a random in-memory cache (no VAE/text "
                     f"encoder); {o['warmup']} warm-up + {o['timed']} timed steps"))

    for attention in str(o["attention"]).split(","):
        results: dict[str, Any] = {}
        for res in resolutions:
            side = res // 8
            adapter = DiffusionAdapter(pipe, resolution=res)
            adapter.vae_scale_factor = 8  # latents of the real VAE's size (the tiny one downsamples by 2)
            adapter.cache = _RandomCache(side, cfg["cross_attention_dim"], pooled, res)
            used: list[str] = []

            def build(attention: str = attention) -> torch.nn.Module:
                torch.manual_seed(0)
                with torch.device(device):
                    unet = UNet2DConditionModel(**cfg)
                used.append(set_attention_backend(unet, attention))  # noqa: B023
                return unet

            runs: dict[str, Any] = {"resolution": res, "latents": f"4x{side}x{side}"}
            fits = True
            for name, loss in (("dpo_frozen", {"loss": "diffusion_dpo", "loss_kwargs": {"beta": 5000.0},
                                               "reference": "frozen"}),
                               ("mapo", {"loss": "mapo", "loss_kwargs": {"beta": 0.1, "scale": 0.5,
                                                                         "num_train_timesteps": 1000}})):
                try:
                    runs[name] = _engine_run(build, adapter, pairs, o, device, tmp / f"sdxl-{attention}-{res}-{name}",
                                             mixed_precision="bf16", gradient_checkpointing=True, max_grad_norm=1.0,
                                             **loss)
                except Exception as exc:  # noqa: BLE001 - recorded, the next measurement still runs
                    runs[name] = {"error": _error(exc)}
                    fits = fits and not isinstance(exc, torch.OutOfMemoryError)
                _cleanup(device)
                if not fits:
                    break
            runs["attention_used"] = used[0] if used else None
            results[str(res)] = runs
            if fits:
                d, m = runs.get("dpo_frozen", {}), runs.get("mapo", {})
                runs["time_ratio_mapo_vs_dpo"] = _ratio(m.get("seconds_per_step"), d.get("seconds_per_step"))
                runs["memory_ratio_mapo_vs_dpo"] = _ratio(m.get("peak_bytes"), d.get("peak_bytes"))
                break  # the largest resolution that fits
        record(attention, results)
        if attention == "xformers" and all(r.get("attention_used") == "sdpa" for r in results.values()):
            record(attention + "_note", "xformers unavailable (no CUDA or not installed): these runs used SDPA")
    record("goal", "MaPO vs DPO (frozen ref): time <= 0.8, peak memory <= 0.75")


# ----------------------------------------------------------------------------------------- ReNO


def _sd_turbo_pipe(o: dict[str, Any], device: torch.device) -> Any:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mmalign.tiny import cached_tiny

    cfgs = sd_turbo_configs(o["tiny"])
    tokenizer = CLIPTokenizer.from_pretrained(cached_tiny("sd"), subfolder="tokenizer")
    tokenizer.model_max_length = 77
    dtype = torch.bfloat16 if _cuda(device) else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfgs["unet"]).to(dtype)
        vae = AutoencoderKL(**cfgs["vae"]).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tokenizer), 49408), **cfgs["text"])).to(dtype)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon",
                                       timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reward(device: torch.device) -> Any:
    from mmalign.rewards import CallableReward, WeightedRewards, mean_redness

    torch.manual_seed(1)
    with torch.device(device):
        cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.SiLU(),
                                  torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.SiLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))
    cnn.requires_grad_(False).eval()

    def cnn_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return cnn(images.float()).squeeze(1)

    return WeightedRewards([(CallableReward(mean_redness, "redness"), 1.0), (CallableReward(cnn_score, "cnn"), 0.1)])


def part_reno(o: dict[str, Any], device: torch.device, record: Record, tmp: Path) -> None:
    from diffusion.reno import optimize_noise

    size, prompt = int(o["reno_size"]), "a red apple on a wooden table"
    base = _mark(device)
    pipe = _sd_turbo_pipe(o, device)
    weights = _peak_since(device, base)
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    reward = _reward(device)
    record("setup", {"model": f"{'tiny' if o['tiny'] else 'SD-Turbo-sized'} StableDiffusionPipeline, random init, "
                              f"{'bf16' if _cuda(device) else 'fp32'}, 1 step (Euler, trailing)",
                     "params": params, "size": size, "weights_GiB": _gib(weights),
                     "reward": "mean redness + 0.1 x random small CNN", "optimizer": "optimize_noise defaults (SGD)"})
    kw = dict(height=size, width=size, progress=False)
    try:
        optimize_noise(pipe, prompt, reward, steps=2, **kw)  # warm-up: lazy inits, kernel selection
        _sync(device)
        t0 = time.perf_counter()
        res = optimize_noise(pipe, prompt, reward, steps=int(o["reno_iters"]), **kw)
        _sync(device)
        total = time.perf_counter() - t0
        iters = res.iteration_times.tolist()
        record("time", {"iterations": int(o["reno_iters"]), "seconds_per_prompt": round(total, 3),
                        "iteration_seconds_median": round(statistics.median(iters), 5),
                        "initial_reward": float(res.initial_rewards[0]), "best_reward": float(res.best_rewards[0]),
                        "nan_skipped": int(res.nan_skipped.sum()), "goal": "seconds_per_prompt < 15 on an H100"})
    except Exception as exc:  # noqa: BLE001
        record("time", {"error": _error(exc)})
    _cleanup(device)
    # ``steps`` images scored, ``steps - 1`` updates: at least 2, so a backward pass is measured
    memory: dict[str, Any] = {"iterations": int(o["reno_mem_iters"])}
    for flag in (False, True):
        key = "on" if flag else "off"
        try:
            base = _mark(device)
            t0 = time.perf_counter()
            optimize_noise(pipe, prompt, reward, steps=int(o["reno_mem_iters"]), gradient_checkpointing=flag,
                           vae_checkpointing=flag, **kw)
            _sync(device)
            peak = _peak_since(device, base)
            memory[key] = {"peak_above_weights_GiB": _gib(peak), "peak_bytes": peak,
                           "seconds": round(time.perf_counter() - t0, 3)}
        except Exception as exc:  # noqa: BLE001
            memory[key] = {"error": _error(exc)}
        _cleanup(device)
    memory["ratio_on_to_off"] = _ratio(memory.get("on", {}).get("peak_bytes"), memory.get("off", {}).get("peak_bytes"))
    record("memory", memory)


# ----------------------------------------------------------------------------------------- LLaVA


def _llava_data(o: dict[str, Any], processor: Any, folder: Path) -> list[Any]:
    import numpy as np
    from PIL import Image

    from mmalign.pairs import PreferencePair, read_pairs, write_pairs

    side = 32 if o["tiny"] else 336
    rng = np.random.default_rng(0)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    words = "the red cube sits on a wooden table next to a small blue cup".split()
    tok = processor.tokenizer
    response = ""
    while len(tok(response, add_special_tokens=False)["input_ids"]) < int(o["llava_response_tokens"]):
        response += " ".join(words) + ". "
    pairs = []
    for i in range(o["warmup"] + o["timed"]):
        Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")).save(folder / f"media/{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image in detail", response,
                                    response.replace("red", "green"), [f"media/{i}.png"]))
    write_pairs(folder, pairs)
    return read_pairs(folder)


def part_llava(o: dict[str, Any], device: torch.device, record: Record, tmp: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmalign.tiny import cached_tiny
    from vision.adapter import VLMAdapter

    processor = AutoProcessor.from_pretrained(cached_tiny("llava"))
    if not o["tiny"]:  # LLaVA-1.5's image size and patch: 336 px / 14 -> 576 image tokens per image
        processor.image_processor.size = {"shortest_edge": 336}
        processor.image_processor.crop_size = {"height": 336, "width": 336}
        processor.patch_size = 14
    tok = processor.tokenizer
    config = llava_config(o["tiny"], vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                          pad_token_id=tok.pad_token_id)
    pairs = _llava_data(o, processor, tmp / "llava_data")
    adapter = VLMAdapter(processor, media_root=tmp / "llava_data")
    batch = adapter.collate(pairs[:1])
    rows = batch["attention_mask"].sum(1).tolist()
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())
    weight_bytes = 2 * n_params
    record("setup", {"model": f"{'tiny' if o['tiny'] else 'LLaVA-1.5-7B-shaped'} LlavaForConditionalGeneration, "
                              "random init, bf16 weights + bf16 autocast, gradient checkpointing, "
                              f"LoRA r={o['lora_r']} (adapter's targets), DPO beta 0.1, 1 pair/step",
                     "params": n_params, "tokens_per_row": rows, "image_tokens": config.image_seq_length})

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        return model

    for reference in str(o["llava_references"]).split(","):
        need = weight_bytes * (2 if reference == "frozen" else 1) * 1.15 + 2**30
        if _cuda(device):
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                record(reference, {"skipped": f"would not fit: needs about {need / 2**30:.1f} GiB (weights"
                                              f"{' x2 for the frozen copy' if reference == 'frozen' else ''} + "
                                              f"activations), {free / 2**30:.1f} GiB free"})
                continue
        try:
            record(reference, _engine_run(build, adapter, pairs, o, device, tmp / f"llava-{reference}",
                                          loss="dpo", loss_kwargs={"beta": 0.1}, reference=reference,
                                          ref_cache_dir=str(tmp / "llava_ref_cache"), lora_r=int(o["lora_r"]),
                                          lora_alpha=2.0 * int(o["lora_r"]), mixed_precision="bf16",
                                          gradient_checkpointing=True, max_grad_norm=1.0))
        except Exception as exc:  # noqa: BLE001
            record(reference, {"error": _error(exc)})
        _cleanup(device)


PARTS: dict[str, Callable[[dict[str, Any], torch.device, Record, Path], None]] = {
    "diffusion": part_diffusion, "reno": part_reno, "llava": part_llava,
}


# ----------------------------------------------------------------------------------------- driver


def _write_json(path: str, data: dict[str, Any]) -> None:
    if path:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)


def _run_part(part: str, o: dict[str, Any], json_path: str) -> dict[str, Any]:
    """Run one part in this process; results are written to ``json_path`` after every measurement."""
    device = torch.device("cuda" if torch.cuda.is_available() and not o["tiny"] else "cpu")
    out: dict[str, Any] = {}

    def record(key: str, value: Any) -> None:
        out[key] = value
        print(f"[cuda:{part}] {key}: {json.dumps(value, default=str)[:600]}", flush=True)
        _write_json(json_path, out)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mmalign-bench-cuda-{part}-") as tmp:
        try:
            PARTS[part](o, device, record, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - setup of the part failed; keep what was measured
            record("error", _error(exc))
    record("seconds", round(time.perf_counter() - t0, 1))
    return out


def _options(args: Any) -> dict[str, Any]:
    o = {k: getattr(args, k, v) for k, v in DEFAULTS.items()} if args is not None else dict(DEFAULTS)
    ap = argparse.ArgumentParser(prog="bench.py cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--part", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-isolate", action="store_true")
    ap.add_argument("--budget", type=float, default=None)
    known, _ = ap.parse_known_args(list(getattr(args, "extra", None) or []))
    if known.tiny:
        o["tiny"] = True
    if o["tiny"]:
        o.update(TINY)
    if known.part:
        o["part"] = known.part
    if known.json:
        o["json"] = known.json
    if known.no_isolate:
        o["isolate"] = False
    if known.budget:
        o["budget"] = known.budget
    for name in o["part"].split(","):
        if name not in PARTS:
            raise ValueError(f"bench cuda: unknown part {name!r}; known: {sorted(PARTS)}")
    if o["warmup"] < 1 or o["timed"] < 1:
        raise ValueError(f"bench cuda: warmup and timed must be >= 1, got {o['warmup']}, {o['timed']}")
    return o


def bench_cuda(args: Any = None) -> dict[str, Any]:
    """Run the parts (see the module docstring); ``args`` carries ``DEFAULTS`` attributes and ``extra`` flags."""
    o = _options(args)
    torch.set_num_threads(int(o["threads"]))
    figures: dict[str, Any] = {"tiny": o["tiny"], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name(0)
    if not torch.cuda.is_available() and not o["tiny"]:
        figures["skipped"] = "no CUDA device; `--tiny` runs the same code paths with tiny configs on the CPU"
        _write_json(o["json"], figures)
        return figures
    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "xformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            versions[name] = f"not importable ({type(exc).__name__})"
    figures["versions"] = versions
    figures["options"] = {k: v for k, v in o.items() if k != "json"}
    start = time.perf_counter()
    for part in o["part"].split(","):
        left = o["budget"] - (time.perf_counter() - start)
        if left < 20:
            figures[part] = {"skipped": f"time budget of {o['budget']} s spent"}
            continue
        if not o["isolate"]:
            figures[part] = _run_part(part, o, "")
        else:
            figures[part] = _child(part, o, left)
        _write_json(o["json"], figures)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(o["json"], figures)
    return figures


def _child(part: str, o: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a part in a fresh process (a crash or a hung kernel costs that part only)."""
    with tempfile.TemporaryDirectory(prefix="mmalign-bench-cuda-") as tmp:
        path = Path(tmp) / "part.json"
        cmd = [sys.executable, "-m", "benchmarks.cuda", "--child", part, "--options", json.dumps(o),
               "--out", str(path)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        note = None
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, check=False, stdout=None,
                                  stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                note = f"child exited with {proc.returncode}: {proc.stderr[-1500:]}"
            elif proc.stderr:
                sys.stderr.write(proc.stderr[-3000:])
        except subprocess.TimeoutExpired:
            note = f"child killed after {timeout:.0f} s (time budget)"
        result = json.loads(path.read_text()) if path.is_file() else {}
        if note:
            result["child_error"] = note
        return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="CUDA benchmark (see the module docstring)")
    p.add_argument("--child", choices=sorted(PARTS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--options", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.child:
        opts = json.loads(a.options)
        torch.set_num_threads(int(opts["threads"]))
        _run_part(a.child, opts, a.out)
    else:
        print(json.dumps(bench_cuda(argparse.Namespace(**DEFAULTS, extra=rest)), indent=1, default=str))
