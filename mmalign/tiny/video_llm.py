"""Tiny video LLMs: LLaVA-NeXT-Video and LLaVA-OneVision (the tiny LLaVA towers plus a ``<video>`` token)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmalign.tiny.common import _CLIP_IMAGE_MEAN, _CLIP_IMAGE_STD, _prepare_dir, _save_model
from mmalign.tiny.text import _generation_config, _llama_text_config
from mmalign.tiny.tokenization import _LLAVA_CHAT_TEMPLATE, make_tiny_tokenizer
from mmalign.tiny.vlm import (
    LLAVA_IMAGE_SIZE,
    LLAVA_NEXT_GRID_PINPOINTS,
    LLAVA_NUM_IMAGE_TOKENS,
    LLAVA_PATCH_SIZE,
    _tiny_clip_vision_config,
)
from mmalign.utils import seeded

__all__ = ["LLAVA_VIDEO_FRAME_TOKENS", "make_tiny_llava_next_video", "make_tiny_llava_onevision"]


LLAVA_VIDEO_FRAME_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE // 2) ** 2  # 4: 2x2 pooled patches per frame


# the LLaVA template with a "<video>\n" slot for {"type": "video"} content items
_LLAVA_VIDEO_CHAT_TEMPLATE = _LLAVA_CHAT_TEMPLATE.replace(
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}",
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif c['type'] == 'video' %}{{ '<video>\n' }}{% endif %}",
)


def _make_tiny_llava_video(out_dir: str | os.PathLike[str], *, seed: int, family: str) -> Path:
    """Shared body of the tiny LLaVA-NeXT-Video / LLaVA-OneVision builders (``family`` picks the classes)."""
    import transformers

    prefix = {"llava_next_video": "LlavaNextVideo", "llava_onevision": "LlavaOnevision"}[family]
    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="llava")
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    pinpoints = [list(p) for p in LLAVA_NEXT_GRID_PINPOINTS]
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_tiny_clip_vision_config(),
        text_config=_llama_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        **({"image_seq_length": LLAVA_NUM_IMAGE_TOKENS, "video_seq_length": LLAVA_VIDEO_FRAME_TOKENS}
           if family == "llava_next_video" else {}),
    )
    with seeded(seed):
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    model.generation_config = _generation_config(tokenizer)
    pixels = {
        "size": {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        "crop_size": {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        "image_mean": list(_CLIP_IMAGE_MEAN),
        "image_std": list(_CLIP_IMAGE_STD),
    }
    image_processor = getattr(transformers, f"{'LlavaNext' if family == 'llava_next_video' else prefix}ImageProcessor")(
        image_grid_pinpoints=pinpoints, **pixels
    )
    video_processor = getattr(transformers, f"{prefix}VideoProcessor")(**pixels)
    extra: dict[str, Any] = (
        {"patch_size": LLAVA_PATCH_SIZE, "num_additional_image_tokens": 1}
        if family == "llava_next_video"
        else {"num_image_tokens": LLAVA_NUM_IMAGE_TOKENS, "vision_aspect_ratio": "anyres_max_9"}
    )
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_VIDEO_CHAT_TEMPLATE,
        **extra,
    )
    return _save_model(out, model, processor)


def make_tiny_llava_next_video(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlavaNextVideoForConditionalGeneration`` with a ``LlavaNextVideoProcessor``, saved to ``out_dir``.

    Towers as :func:`make_tiny_llava` (CLIP 32x32, patch 8, CLS dropped; Llama hidden 32) plus a ``<video>``
    token. Frames are resized to 32x32; the spatial pool (stride 2) leaves
    :data:`LLAVA_VIDEO_FRAME_TOKENS` = 4 tokens per frame, so a 16-frame clip is 64 video tokens.
    """
    return _make_tiny_llava_video(out_dir, seed=seed, family="llava_next_video")


def make_tiny_llava_onevision(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlavaOnevisionForConditionalGeneration`` with a ``LlavaOnevisionProcessor``, saved to ``out_dir``.

    Same towers and ``<video>`` token as :func:`make_tiny_llava_next_video`; frames 32x32, bilinear 2x
    pooling -> 4 tokens per frame plus one newline token per video (16 frames -> 65 video tokens).
    """
    return _make_tiny_llava_video(out_dir, seed=seed, family="llava_onevision")
