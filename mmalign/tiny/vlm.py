"""Tiny vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign.tiny.common import _CLIP_IMAGE_MEAN, _CLIP_IMAGE_STD, _prepare_dir, _save_model
from mmalign.tiny.text import _generation_config, _llama_text_config
from mmalign.tiny.tokenization import _LLAVA_CHAT_TEMPLATE, _QWEN_CHAT_TEMPLATE, make_tiny_tokenizer
from mmalign.utils import seeded

__all__ = [
    "LLAVA_IMAGE_SIZE",
    "LLAVA_PATCH_SIZE",
    "LLAVA_NUM_IMAGE_TOKENS",
    "QWEN2VL_MIN_PIXELS",
    "QWEN2VL_MAX_PIXELS",
    "LLAVA_NEXT_GRID_PINPOINTS",
    "IDEFICS3_TILE_SIZE",
    "IDEFICS3_PATCH_SIZE",
    "IDEFICS3_SCALE_FACTOR",
    "IDEFICS3_IMAGE_SEQ_LEN",
    "make_tiny_llava",
    "make_tiny_qwen2vl",
    "make_tiny_llava_next",
    "make_tiny_qwen2_5_vl",
    "make_tiny_idefics3",
    "make_tiny_smolvlm",
]


LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8
LLAVA_NUM_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2  # 16
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 112 * 112
LLAVA_NEXT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = ((32, 32), (32, 64), (64, 32))  # (height, width)
IDEFICS3_TILE_SIZE = 32
IDEFICS3_PATCH_SIZE = 8
IDEFICS3_SCALE_FACTOR = 2
IDEFICS3_IMAGE_SEQ_LEN = (IDEFICS3_TILE_SIZE // IDEFICS3_PATCH_SIZE) ** 2 // IDEFICS3_SCALE_FACTOR**2  # 4


_IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{{ ':' }}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ ' ' + c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# SmolVLM's own template shape: "<|im_start|>" once, no space between an image and the text after it.
_SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tiny_clip_vision_config() -> Any:
    """The CLIP vision tower of the tiny LLaVA models: 32x32 images, patch 8, hidden 32, 2 layers."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH_SIZE,
        projection_dim=32,
    )


def _make_tiny_llava_family(
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    classes: tuple[str, str, str, str],
    **anyres: Any,
) -> Path:
    """Shared body of the tiny LLaVA-1.5 / LLaVA-NeXT builders: CLIP tower, Llama text model, processor.

    ``classes`` names the transformers (config, model, image processor, processor) classes of the family;
    ``anyres`` (LLaVA-NeXT's ``image_grid_pinpoints``) goes to both the config and the image processor.
    """
    import transformers

    config_cls, model_cls, image_processor_cls, processor_cls = (getattr(transformers, n) for n in classes)
    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="llava")
    config = config_cls(
        vision_config=_tiny_clip_vision_config(),
        text_config=_llama_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=LLAVA_NUM_IMAGE_TOKENS,
        **anyres,
    )
    with seeded(seed):
        model = model_cls(config)
    model.generation_config = _generation_config(tokenizer)
    image_processor = image_processor_cls(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        do_center_crop=True,
        image_mean=list(_CLIP_IMAGE_MEAN),
        image_std=list(_CLIP_IMAGE_STD),
        **anyres,
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    return _save_model(out, model, processor)


def make_tiny_llava(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlavaForConditionalGeneration`` with a matching ``LlavaProcessor``, saved to ``out_dir``.

    Vision tower: CLIP, 32x32 images, patch 8, hidden 32, 2 layers -> 16 patch features + CLS; the
    ``"default"`` feature strategy drops CLS, so each image is :data:`LLAVA_NUM_IMAGE_TOKENS` = 16 tokens,
    and the processor (``patch_size=8``, ``num_additional_image_tokens=1``) expands ``<image>`` to 16.
    Text model: Llama, hidden 32, 2 layers. Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    classes = ("LlavaConfig", "LlavaForConditionalGeneration", "CLIPImageProcessor", "LlavaProcessor")
    return _make_tiny_llava_family(out_dir, seed=seed, classes=classes)


def _make_tiny_qwen_vl(
    out_dir: str | os.PathLike[str], *, seed: int, vision_config: dict[str, Any], classes: tuple[str, str, str]
) -> Path:
    """Shared body of the tiny Qwen2-VL / Qwen2.5-VL builders: tokenizer, text model, processors, saving.

    ``classes`` names the transformers (config, model, processor) classes of the family.
    """
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    config_cls, model_cls, processor_cls = (getattr(transformers, name) for name in classes)
    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="qwen")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.extra_special_tokens}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = model_cls(config)
    model.generation_config = _generation_config(tokenizer)  # no bos: Qwen has none
    size = {"shortest_edge": QWEN2VL_MIN_PIXELS, "longest_edge": QWEN2VL_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(
        size=size,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_frames=2,
        max_frames=16,
        cap_pixels_per_frame=True,
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    return _save_model(out, model, processor)


def make_tiny_qwen2vl(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``Qwen2VLForConditionalGeneration`` with a matching ``Qwen2VLProcessor``, saved to ``out_dir``.

    Vision: depth 2, embed dim 32, 2 heads, patch 14, temporal patch 2, spatial merge 2, so one image token
    per 28x28 pixels; images are resized (``smart_resize``) to between :data:`QWEN2VL_MIN_PIXELS` (56x56,
    4 tokens) and :data:`QWEN2VL_MAX_PIXELS` (112x112, 16 tokens) pixels, sides multiples of 28. Videos use
    the same pixel budget per frame, two frames per temporal patch (8 frames at 56x56 -> 4 x 4 = 16 tokens).
    Text: Qwen2 decoder, hidden 32, 2 layers, 2 heads of dim 16, M-RoPE sections (2, 3, 3) (sum 8 = 16 / 2).
    Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    vision_config = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    return _make_tiny_qwen_vl(out_dir, seed=seed, vision_config=vision_config,
                              classes=("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"))


def make_tiny_llava_next(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlavaNextForConditionalGeneration`` (anyres tiling) with a ``LlavaNextProcessor``.

    Vision tower and text model as :func:`make_tiny_llava` (CLIP 32x32, patch 8 -> 4x4 patch features per
    tile, CLS dropped; Llama hidden 32). Anyres grid :data:`LLAVA_NEXT_GRID_PINPOINTS` (height, width):
    ``[[32, 32], [32, 64], [64, 32]]``, so an image becomes a 32x32 base tile plus one or two 32x32 tiles,
    and ``pixel_values`` is ``(n_images, max_tiles, 3, 32, 32)`` with ``image_sizes`` ``(n_images, 2)``.
    Image tokens = 16 (base) + unpadded grid features + one newline per feature row, e.g. a 40x50 (h x w)
    image picks 32x64: 16 + 4 * 6 + 4 = 44 tokens; a square image picks 32x32: 16 + 4 * 4 + 4 = 36.
    Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    """
    classes = (
        "LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextImageProcessor", "LlavaNextProcessor"
    )
    pinpoints = [list(p) for p in LLAVA_NEXT_GRID_PINPOINTS]
    return _make_tiny_llava_family(out_dir, seed=seed, classes=classes, image_grid_pinpoints=pinpoints)


def make_tiny_qwen2_5_vl(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``Qwen2_5_VLForConditionalGeneration`` with a ``Qwen2_5_VLProcessor``, saved to ``out_dir``.

    Same tokenizer, chat template, text model and pixel budget as :func:`make_tiny_qwen2vl` (one image
    token per 28x28 pixels, 4 to 16 tokens per image). Vision: Qwen2.5-VL's RMSNorm/SwiGLU tower, depth 2,
    hidden 32, 2 heads, ``out_hidden_size=32``; window attention with ``window_size=56`` pixels (2x2 merged
    tokens per window) in block 0 and full attention in block 1 (``fullatt_block_indexes=[1]``), so both
    paths run; ``tokens_per_second=2`` for video M-RoPE (``second_per_grid_ts``).
    """
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    classes = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    return _make_tiny_qwen_vl(out_dir, seed=seed, vision_config=vision_config, classes=classes)


def _make_tiny_tiled_vlm(
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    config_cls: Any,
    model_cls: Any,
    make_processor: Callable[[Any, dict[str, Any]], Any],
    extra_tokens: tuple[str, ...] = (),
) -> Path:
    """The Idefics3 design shared by :func:`make_tiny_idefics3` and :func:`make_tiny_smolvlm`.

    Builds the LLaVA-flavour tokenizer plus the tile markers, ``<end_of_utterance>`` (the eos) and
    ``extra_tokens``; a Llama text model and a SigLIP-style vision tower (32x32 tiles, patch 8, pixel
    shuffle 2) under ``config_cls`` / ``model_cls``; and the processor ``make_processor(tokenizer,
    image_kwargs)``, where ``image_kwargs`` are the tile-splitting settings for the family's image processor.
    """
    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="llava")
    markers = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    markers += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer.add_tokens(markers + list(extra_tokens), special_tokens=True)
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text_config = _llama_text_config(tokenizer, eos_token_id=end_of_utterance)
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IDEFICS3_TILE_SIZE,
        "patch_size": IDEFICS3_PATCH_SIZE,
    }
    config = config_cls(
        vision_config=vision_config,
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=IDEFICS3_SCALE_FACTOR,
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = model_cls(config)
    model.generation_config = _generation_config(tokenizer, eos_token_id=end_of_utterance)
    image_kwargs = {
        "size": {"longest_edge": 2 * IDEFICS3_TILE_SIZE},
        "max_image_size": {"longest_edge": IDEFICS3_TILE_SIZE},
        "do_image_splitting": True,
    }
    return _save_model(out, model, make_processor(tokenizer, image_kwargs))


def make_tiny_idefics3(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``Idefics3ForConditionalGeneration`` with an ``Idefics3Processor``.

    Vision: SigLIP-style, 32x32 tiles (:data:`IDEFICS3_TILE_SIZE`), patch 8 -> 16 patch features, pixel
    shuffle ``scale_factor=2`` -> :data:`IDEFICS3_IMAGE_SEQ_LEN` = 16 / 2**2 = 4 image tokens per tile.
    Image splitting on: an image is resized to longest edge 64, then split into 32x32 tiles plus a 32x32
    global view, so most photos give 2x2 + 1 = 5 tiles = 20 image tokens and one about twice as wide as
    tall (or more) 1x2 + 1 = 3 tiles = 12; ``pixel_values`` is ``(n_samples, max_tiles, 3, 32, 32)`` (all-zero padding
    tiles) with ``pixel_attention_mask`` ``(n_samples, max_tiles, 32, 32)``. The prompt carries Idefics3's
    ``<fake_token_around_image>``, ``<row_r_col_c>`` and ``<global-img>`` markers around the image tokens.
    Text: Llama, hidden 32, 2 layers; the LLaVA-flavour tokenizer plus those tokens and
    ``<end_of_utterance>`` (the eos); chat template ``"User:<image> {prompt}<end_of_utterance>\\nAssistant:"``.
    SmolVLM checkpoints (model type ``smolvlm``) have their own classes: :func:`make_tiny_smolvlm`.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    def make_processor(tokenizer: Any, image_kwargs: dict[str, Any]) -> Any:
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
            chat_template=_IDEFICS3_CHAT_TEMPLATE,
        )

    return _make_tiny_tiled_vlm(
        out_dir,
        seed=seed,
        config_cls=Idefics3Config,
        model_cls=Idefics3ForConditionalGeneration,
        make_processor=make_processor,
    )


def make_tiny_smolvlm(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``SmolVLMForConditionalGeneration`` (model type ``smolvlm``) with a ``SmolVLMProcessor``.

    The Idefics3 design under SmolVLM's classes: the same tiles, token counts, markers and weights layout as
    :func:`make_tiny_idefics3` (4 image tokens per 32x32 tile; 12 or 20 per image), plus a
    ``SmolVLMVideoProcessor`` (frames resized to one 32x32 tile) that the processor requires. The chat
    template is SmolVLM's: ``"<|im_start|>User:<image>{prompt}<end_of_utterance>\\nAssistant:"`` (no space
    after an image; ``<|im_start|>`` is an extra special token). The processor needs the ``num2words``
    package (transformers raises ImportError without it).
    """
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    def make_processor(tokenizer: Any, image_kwargs: dict[str, Any]) -> Any:
        video_processor = SmolVLMVideoProcessor(
            size={"longest_edge": IDEFICS3_TILE_SIZE}, max_image_size={"longest_edge": IDEFICS3_TILE_SIZE}
        )
        return SmolVLMProcessor(
            image_processor=SmolVLMImageProcessor(**image_kwargs),
            tokenizer=tokenizer,
            video_processor=video_processor,
            image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
            chat_template=_SMOLVLM_CHAT_TEMPLATE,
        )

    return _make_tiny_tiled_vlm(
        out_dir,
        seed=seed,
        config_cls=SmolVLMConfig,
        model_cls=SmolVLMForConditionalGeneration,
        make_processor=make_processor,
        extra_tokens=("<|im_start|>",),
    )
