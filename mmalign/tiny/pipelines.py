"""Tiny diffusers pipelines: Stable Diffusion 1.x, SDXL, SD3 and Flux (schnell and dev variants)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmalign.tiny.common import _prepare_dir
from mmalign.tiny.tokenization import _clip_tokenizer, _t5_tokenizer, _write_clip_vocab_files
from mmalign.utils import seeded

__all__ = ["SD_IMAGE_SIZE", "make_tiny_sd", "make_tiny_sdxl", "make_tiny_sd3", "FLUX_VARIANTS", "make_tiny_flux"]


SD_IMAGE_SIZE = 32
_SCHEDULERS = ("ddpm", "ddim", "euler", "euler_ancestral")


def _save_pipeline(pipe: Any, out: Path, *, clip_tokenizers: tuple[str, ...]) -> Path:
    """Save a tiny diffusers pipeline (safetensors) and the CLIP vocab files of its ``clip_tokenizers``."""
    pipe.save_pretrained(out, safe_serialization=True)
    for name in clip_tokenizers:
        _write_clip_vocab_files(out / name)
    return out


def _clip_text_config(tokenizer: Any, *, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _tiny_vae(*, latent_channels: int = 4, **extra: Any) -> Any:
    """AutoencoderKL with two blocks (32, 64): downscale factor 2, 32x32 images -> 16x16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=SD_IMAGE_SIZE,
        **extra,
    )


def _tiny_flow_vae(*, scaling_factor: float, shift_factor: float) -> Any:
    """The 16-channel VAE of the SD3 / Flux pipelines (no quant convs) with the family's latent scaling."""
    return _tiny_vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _tiny_unet(*, cross_attention_dim: int, **extra: Any) -> Any:
    """The SD / SDXL UNet: blocks (32, 64), one layer each, 4 latent channels at 16x16; ``extra`` adds
    SDXL's conditioning settings."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        **extra,
    )


def _sd_scheduler(name: str, prediction_type: str) -> Any:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name not in _SCHEDULERS:
        raise ValueError(f"tiny SD scheduler must be one of {_SCHEDULERS}, got {name!r}")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )
    common: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
    }
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False, steps_offset=1)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "euler":
        return EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    return EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")


def make_tiny_sd(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    scheduler: str = "ddpm",
) -> Path:
    """Tiny ``StableDiffusionPipeline`` folder (SD 1.x layout), loadable with ``from_pretrained``.

    UNet: blocks (32, 64), one layer each, cross-attention dim 32, latent 4x16x16. VAE: downscale 2, so
    the native size is 32x32 pixels. Text: ``CLIPTextModel`` (hidden 32, 2 layers) + a CLIP BPE tokenizer
    (max length 16). ``scheduler`` is one of ``"ddpm"``, ``"ddim"``, ``"euler"``, ``"euler_ancestral"``
    (the Euler ones use trailing timestep spacing, so one-step "turbo" sampling works).
    No safety checker, no feature extractor.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    out = _prepare_dir(out_dir)
    noise_scheduler = _sd_scheduler(scheduler, prediction_type)
    tokenizer = _clip_tokenizer()
    with seeded(seed):
        unet = _tiny_unet(cross_attention_dim=32)
    with seeded(seed + 1):
        vae = _tiny_vae()
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_pipeline(pipe, out, clip_tokenizers=("tokenizer",))


def make_tiny_sdxl(
    out_dir: str | os.PathLike[str], *, seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Tiny ``StableDiffusionXLPipeline`` folder.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden 32 each, projection 32)
    whose penultimate hidden states concatenate to the UNet's cross-attention dim 64; ``text_time``
    added conditioning with ``addition_time_embed_dim=8``, so
    ``projection_class_embeddings_input_dim = 6 * 8 + 32 = 80``. Native size 32x32 (latents 4x16x16).
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = _prepare_dir(out_dir)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    noise_scheduler = _sd_scheduler("euler", prediction_type)
    with seeded(seed):
        unet = _tiny_unet(
            cross_attention_dim=64,
            transformer_layers_per_block=1,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    with seeded(seed + 1):
        vae = _tiny_vae(force_upcast=False)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    with seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=noise_scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _save_pipeline(pipe, out, clip_tokenizers=("tokenizer", "tokenizer_2"))


def _tiny_t5(tokenizer: Any, *, d_model: int) -> Any:
    """A 2-layer, 4-head T5 encoder for the tiny SD3 / Flux pipelines (call under ``seeded``)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def make_tiny_sd3(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``StableDiffusion3Pipeline`` folder (flow matching), loadable with a plain ``from_pretrained``.

    ``SD3Transformer2DModel``: 16 latent channels, patch 2, one joint block, 4 heads x 8 dims,
    ``joint_attention_dim=64`` (= the T5 width, and the two CLIP encoders' hidden states, 32 + 32,
    concatenated), ``pooled_projection_dim=64`` (their projections, 32 + 32). VAE: 16 latent channels,
    downscale 2, SD3's ``shift_factor``/``scaling_factor``; native size 32x32 (latents 16x16x16, 64 image
    tokens). Text: two ``CLIPTextModelWithProjection`` + CLIP tokenizers, and a tiny ``T5EncoderModel``
    (d_model 64, 2 layers) with a Unigram tokenizer; pass ``max_sequence_length=8`` (default 256) to keep
    sampling fast, or load with ``text_encoder_3=None, tokenizer_3=None`` to drop T5 as with real SD3.
    Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = _prepare_dir(out_dir)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=SD_IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
    with seeded(seed + 1):
        vae = _tiny_flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    with seeded(seed + 2):
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=32))
    with seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, projection_dim=32))
    with seeded(seed + 4):
        text_encoder_3 = _tiny_t5(tokenizer_3, d_model=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save_pipeline(pipe, out, clip_tokenizers=("tokenizer", "tokenizer_2"))


FLUX_VARIANTS = ("schnell", "dev")


def make_tiny_flux(out_dir: str | os.PathLike[str], *, seed: int = 0, variant: str = "schnell") -> Path:
    """Tiny ``FluxPipeline`` folder (flow matching, packed latents), loadable with a plain ``from_pretrained``.

    VAE: 16 latent channels, downscale 2 (``pipe.vae_scale_factor == 2``), FLUX.1's ``scaling_factor``
    0.3611 / ``shift_factor`` 0.1159, no quant convs; 32x32 images -> latents 16x16x16, which the pipeline
    packs into 2x2 patches: 8x8 = 64 image tokens of 16 * 4 = 64 channels. Pass ``height=width=32``
    when sampling: ``FluxPipeline`` defaults to ``128 * vae_scale_factor`` pixels whatever the model.
    ``FluxTransformer2DModel``: ``in_channels=64``, one double-stream and one single-stream block,
    2 heads x 16 dims (rotary axes 4 + 6 + 6), ``joint_attention_dim=32`` (the T5 width),
    ``pooled_projection_dim=32`` (the CLIP width). Text: ``CLIPTextModel`` (pooled output only, hidden 32,
    max length 16) and a tiny ``T5EncoderModel`` (d_model 32, 2 layers) with the Unigram tokenizer of
    :func:`make_tiny_sd3`; pass ``max_sequence_length=8`` (default 512) to sample fast.

    ``variant="schnell"`` (timestep-distilled): no guidance embedding, ``FlowMatchEulerDiscreteScheduler``
    with ``shift=1.0`` and no dynamic shifting. ``variant="dev"`` (guidance-distilled):
    ``guidance_embeds=True`` and dynamic shifting (``shift=3.0``, ``base_shift=0.5``, ``max_shift=1.15``),
    as the FLUX.1 checkpoints are configured.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if variant not in FLUX_VARIANTS:
        raise ValueError(f"make_tiny_flux: variant must be one of {FLUX_VARIANTS}, got {variant!r}")
    dev = variant == "dev"
    out = _prepare_dir(out_dir)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=dev,
            axes_dims_rope=(4, 6, 6),
        )
    with seeded(seed + 1):
        vae = _tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    with seeded(seed + 3):
        text_encoder_2 = _tiny_t5(tokenizer_2, d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _save_pipeline(pipe, out, clip_tokenizers=("tokenizer",))
