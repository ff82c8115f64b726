"""Tiny, randomly initialised models of every supported family, for tests, demos and benchmarks.

Each builder writes a folder with ``save_pretrained`` and returns its :class:`~pathlib.Path`; the folder is
then read back through the same ``from_pretrained`` path a real checkpoint uses (``AutoProcessor``,
``AutoModelForImageTextToText``, ``StableDiffusionPipeline`` ...). Nothing is downloaded: tokenizers are
byte-level BPEs whose merges come from a small built-in word list (:mod:`mmalign.tiny.tokenization`).

Determinism: every builder seeds a forked torch RNG before creating each model, so the same ``seed`` gives
bitwise-identical weights (on the same torch build) and the caller's global RNG state is left untouched.

Shapes other code relies on (all CPU-fast, forward passes in milliseconds):

* LLaVA: images 32x32 (``CLIPImageProcessor`` resizes/crops to 32), patch 8 -> 4x4 = 16 image tokens
  (CLS dropped by the ``"default"`` feature strategy); the processor expands one ``<image>`` to 16.
* Qwen2-VL: patch 14, spatial merge 2 -> one image token per 28x28 pixels; ``min_pixels = 56*56``,
  ``max_pixels = 112*112`` so an image becomes 4 to 16 image tokens (a square photo: 112x112 -> 16).
* LLaVA-NeXT: LLaVA's towers + anyres tiles of 32x32 on the grid 32x32 / 32x64 / 64x32; 36 to 44 image
  tokens per image (base 16 + unpadded tile features + newlines).
* Qwen2.5-VL: Qwen2-VL's pixel budget and token counts; window attention (56 px) in vision block 0.
* Idefics3 and SmolVLM (own classes, same design): 32x32 tiles, patch 8, pixel shuffle 2 -> 4 tokens per
  tile; images split into up to 2x2 tiles + a global view (longest edge 64) -> 12 or 20 image tokens.
* Stable Diffusion (1.x style): 32x32 images, VAE downscale 2 -> 4x16x16 latents; text 16 tokens x 32.
* SDXL: 32x32 images, 4x16x16 latents; two text encoders (32 + 32 hidden -> 64 cross-attention dim).
* SD3: 32x32 images, VAE downscale 2 -> 16x16x16 latents (16 channels), transformer patch 2 -> 64 tokens;
  text: two CLIP encoders + a tiny T5 (pass ``max_sequence_length=8`` to sample fast).
* Flux: 32x32 images, VAE downscale 2 -> 16x16x16 latents packed in 2x2 patches -> 64 tokens x 64;
  text: CLIP (pooled) + a tiny T5; sample with ``height=width=32, max_sequence_length=8``.
* open_clip: 32x32 images, patch 8, embedding dim 32, context length 16.

Modules, one per family: :mod:`~mmalign.tiny.tokenization`, :mod:`~mmalign.tiny.text` (Llama),
:mod:`~mmalign.tiny.vlm`, :mod:`~mmalign.tiny.video_llm`, :mod:`~mmalign.tiny.pipelines` (diffusers),
:mod:`~mmalign.tiny.openclip`; :mod:`~mmalign.tiny.registry` holds :data:`TINY_BUILDERS` (the ``tiny:<name>``
names) and :func:`cached_tiny`. Production code reaches this package only to resolve ``tiny:<name>`` models;
:func:`seeded` lives in :mod:`mmalign.utils` and is re-exported here.
"""

from __future__ import annotations

from mmalign.tiny.openclip import (
    OPEN_CLIP_MODEL_CFG,
    OPEN_CLIP_PREPROCESS_CFG,
    load_tiny_open_clip,
    make_tiny_open_clip,
)
from mmalign.tiny.pipelines import (
    FLUX_VARIANTS,
    SD_IMAGE_SIZE,
    make_tiny_flux,
    make_tiny_sd,
    make_tiny_sd3,
    make_tiny_sdxl,
)
from mmalign.tiny.registry import _MEMO, TINY_BUILDERS, _cache_key, cached_tiny  # noqa: F401  (_MEMO, _cache_key: tests)
from mmalign.tiny.text import make_tiny_causal_lm
from mmalign.tiny.tokenization import CLIP_MAX_LENGTH, make_tiny_tokenizer
from mmalign.tiny.video_llm import (
    LLAVA_VIDEO_FRAME_TOKENS,
    make_tiny_llava_next_video,
    make_tiny_llava_onevision,
)
from mmalign.tiny.vlm import (
    IDEFICS3_IMAGE_SEQ_LEN,
    IDEFICS3_PATCH_SIZE,
    IDEFICS3_SCALE_FACTOR,
    IDEFICS3_TILE_SIZE,
    LLAVA_IMAGE_SIZE,
    LLAVA_NEXT_GRID_PINPOINTS,
    LLAVA_NUM_IMAGE_TOKENS,
    LLAVA_PATCH_SIZE,
    QWEN2VL_MAX_PIXELS,
    QWEN2VL_MIN_PIXELS,
    make_tiny_idefics3,
    make_tiny_llava,
    make_tiny_llava_next,
    make_tiny_qwen2_5_vl,
    make_tiny_qwen2vl,
    make_tiny_smolvlm,
)
from mmalign.utils import seeded

__all__ = [
    "CLIP_MAX_LENGTH",
    "IDEFICS3_IMAGE_SEQ_LEN",
    "IDEFICS3_PATCH_SIZE",
    "IDEFICS3_SCALE_FACTOR",
    "IDEFICS3_TILE_SIZE",
    "LLAVA_IMAGE_SIZE",
    "LLAVA_NEXT_GRID_PINPOINTS",
    "LLAVA_NUM_IMAGE_TOKENS",
    "LLAVA_PATCH_SIZE",
    "LLAVA_VIDEO_FRAME_TOKENS",
    "QWEN2VL_MAX_PIXELS",
    "QWEN2VL_MIN_PIXELS",
    "SD_IMAGE_SIZE",
    "TINY_BUILDERS",
    "cached_tiny",
    "load_tiny_open_clip",
    "OPEN_CLIP_MODEL_CFG",
    "OPEN_CLIP_PREPROCESS_CFG",
    "FLUX_VARIANTS",
    "make_tiny_causal_lm",
    "make_tiny_flux",
    "make_tiny_idefics3",
    "make_tiny_llava",
    "make_tiny_llava_next",
    "make_tiny_llava_next_video",
    "make_tiny_llava_onevision",
    "make_tiny_open_clip",
    "make_tiny_qwen2_5_vl",
    "make_tiny_qwen2vl",
    "make_tiny_sd",
    "make_tiny_sd3",
    "make_tiny_sdxl",
    "make_tiny_smolvlm",
    "make_tiny_tokenizer",
    "seeded",
]
