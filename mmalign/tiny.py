"""Tiny, randomly initialised models of every supported family, for tests, demos and benchmarks.

Each builder writes a folder with ``save_pretrained`` and returns its :class:`~pathlib.Path`; the folder is
then read back through the same ``from_pretrained`` path a real checkpoint uses (``AutoProcessor``,
``AutoModelForImageTextToText``, ``StableDiffusionPipeline`` ...). Nothing is downloaded: tokenizers are
byte-level BPEs whose merges come from a small built-in word list, written out by this module.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmalign.files import honour_umask

__all__ = [
    "IDEFICS3_IMAGE_SEQ_LEN",
    "IDEFICS3_TILE_SIZE",
    "LLAVA_IMAGE_SIZE",
    "LLAVA_NEXT_GRID_PINPOINTS",
    "LLAVA_NUM_IMAGE_TOKENS",
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
SD_IMAGE_SIZE = 32
CLIP_MAX_LENGTH = 16

# Small built-in corpus: BPE merges are derived from these words so that common prompt words are
# single tokens; anything else still tokenizes (byte-level fallback), just into more pieces.
_CORPUS_WORDS: tuple[str, ...] = (
    "a an the of in on with and is are this that what there it to for image photo picture describe "
    "detail details red green blue yellow white black cube sphere cat dog astronaut coffee cup man woman "
    "person tree car house sky table chair small large left right top bottom yes no question answer "
    "color colour shape object objects many how where who does do see shown scene"
).split()

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c or 'image_url' in c %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' or 'video' in c %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in c %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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

# --------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside a forked RNG, so the block is deterministic and the caller's random state is kept.

    The CPU generator is always forked; a CUDA ``device`` has its generator forked too (sampling on the GPU).
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _prepare_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"tiny model output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 style byte-level BPE uses for raw bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _word_merges(symbols_per_word: list[list[str]]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn each word's symbol list into one symbol (deduplicated, ordered).

    Merging strictly left to right gives a valid BPE: each merge's inputs exist before the merge,
    and applying the merges in rank order rebuilds every corpus word as one token.
    """
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for symbols in symbols_per_word:
        if len(symbols) < 2:
            continue
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
    return merges


def _add_merged_symbols(vocab_list: list[str], merges: list[tuple[str, str]]) -> None:
    """Append each merge's result to ``vocab_list`` (in merge order) unless it is there already."""
    known = set(vocab_list)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            vocab_list.append(left + right)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE (``</w>`` end-of-word suffix) over the built-in corpus; specials come last."""
    byte_table = _byte_alphabet()
    alphabet = sorted(set(byte_table))
    vocab_list: list[str] = list(alphabet) + [c + "</w>" for c in alphabet]
    words = []
    for word in _CORPUS_WORDS:
        chars = [byte_table[b] for b in word.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        words.append(chars)
    merges = _word_merges(words)
    _add_merged_symbols(vocab_list, merges)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return vocab, merges


def _save_clip_tokenizer(folder: Path, *, max_length: int = CLIP_MAX_LENGTH) -> Any:
    """Write vocab.json / merges.txt for a tiny CLIP tokenizer into ``folder`` and return it loaded back."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def make_tiny_tokenizer(*, flavour: str = "llava") -> Any:
    """A byte-level BPE tokenizer built offline, wrapped as a ``PreTrainedTokenizerFast``.

    ``flavour="llava"``: Llama/LLaVA-1.5 style, ``<s>`` prepended, ``</s>`` eos, ``<pad>``, ``<image>``,
    LLaVA-1.5 chat template (``"USER: <image>\\n{prompt} ASSISTANT:"``).
    ``flavour="qwen"``: Qwen2 style, no bos, ``<|im_end|>`` eos, ``<|endoftext|>`` pad, the vision tokens
    ``<|vision_start|> <|image_pad|> <|video_pad|> <|vision_end|>`` and a ChatML template.

    The vocabulary is 256 byte symbols + merges of the built-in corpus + the special tokens (a few
    hundred ids); ``len(tokenizer)`` is the vocab size to give a model.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if flavour not in ("llava", "qwen"):
        raise ValueError(f"make_tiny_tokenizer: flavour must be 'llava' or 'qwen', got {flavour!r}")
    byte_table = _byte_alphabet()
    # Space-prefixed words first: their merges all start with the space symbol and rank before any
    # bare-word merge, so " red" inside a sentence becomes one token instead of "Ġ" + "red".
    variants = [" " + word for word in _CORPUS_WORDS] + list(_CORPUS_WORDS)
    merges = _word_merges([[byte_table[b] for b in v.encode("utf-8")] for v in variants])
    vocab_list = list(byte_table)
    _add_merged_symbols(vocab_list, merges)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    if flavour == "llava":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        extra = ["<image>"]
    else:
        specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        extra = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    backend.add_special_tokens(list(specials.values()) + extra)
    if flavour == "llava":
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_LLAVA_CHAT_TEMPLATE if flavour == "llava" else _QWEN_CHAT_TEMPLATE,
        padding_side="left" if flavour == "llava" else "right",
        model_max_length=2048,
        extra_special_tokens=extra,
        **specials,
    )
    return tokenizer


def _llama_text_config(tokenizer: Any, *, eos_token_id: int | None = None) -> Any:
    """The tiny Llama text model (hidden 32, 2 layers, 4 heads) for ``tokenizer``'s vocabulary and special ids.

    ``eos_token_id`` overrides the tokenizer's eos (Idefics3 ends turns with ``<end_of_utterance>``).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: Any, *, eos_token_id: int | None = None) -> Any:
    """A ``GenerationConfig`` with ``tokenizer``'s bos / eos / pad ids (``eos_token_id`` overrides the eos)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _save_model(out: Path, model: Any, processor: Any) -> Path:
    """Save a tiny transformers model and its processor (or tokenizer) into ``out``; return ``out``."""
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# vision-language models


def make_tiny_causal_lm(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads) + the LLaVA-flavour tokenizer.

    Loads with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    from transformers import LlamaForCausalLM

    out = _prepare_dir(out_dir)
    tokenizer = make_tiny_tokenizer(flavour="llava")
    config = _llama_text_config(tokenizer)
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config = _generation_config(tokenizer)
    return _save_model(out, model, tokenizer)


_CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


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


# --------------------------------------------------------------------------------------------------
# diffusion pipelines

_SCHEDULERS = ("ddpm", "ddim", "euler", "euler_ancestral")


def _clip_tokenizer(*, max_length: int = CLIP_MAX_LENGTH) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _write_clip_vocab_files(folder: Path) -> None:
    """Make sure a saved CLIP tokenizer folder also holds the classic vocab.json / merges.txt pair."""
    vocab, merges = _clip_vocab_and_merges()
    if not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if not (folder / "merges.txt").exists():
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )


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


def _t5_tokenizer() -> Any:
    """A tiny Unigram (SentencePiece-style) T5 tokenizer: specials, corpus words, single characters."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for word in _CORPUS_WORDS:
        for piece in ("\u2581" + word, word):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"()-"
    for char in chars:
        for piece in (char, "\u2581" + char):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -5.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)


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


# --------------------------------------------------------------------------------------------------
# open_clip

OPEN_CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32,
        "layers": 2,
        "width": 32,
        "head_width": 16,
        "patch_size": 8,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}
OPEN_CLIP_PREPROCESS_CFG: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": list(_CLIP_IMAGE_MEAN),
    "std": list(_CLIP_IMAGE_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def make_tiny_open_clip(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Tiny open_clip CLIP in open_clip's local-folder layout: ``open_clip_config.json`` + safetensors.

    Config (:data:`OPEN_CLIP_MODEL_CFG`): embedding dim 32; vision ViT 32x32 images, patch 8, width 32,
    2 layers, 2 heads; text context 16, open_clip's own BPE vocabulary (49408 ids, so open_clip's bundled
    ``SimpleTokenizer`` works offline), width 32, 2 layers. ``open_clip.create_model("local-dir:<path>")``
    and ``open_clip.get_tokenizer("local-dir:<path>")`` read the folder; :func:`load_tiny_open_clip` wraps them.
    """
    import open_clip  # lazy: optional heavy import
    from safetensors.torch import save_file

    out = _prepare_dir(out_dir)
    config = {"model_cfg": OPEN_CLIP_MODEL_CFG, "preprocess_cfg": OPEN_CLIP_PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = out / "open_clip_model.safetensors"
    with seeded(seed):
        # the same class create_model("local-dir:...") builds from this config, without its
        # "no weights found, initialised randomly" warnings
        model = open_clip.CLIP(**OPEN_CLIP_MODEL_CFG)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    return out


def load_tiny_open_clip(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """Rebuild a model saved by :func:`make_tiny_open_clip` through open_clip's own local-folder loader.

    Returns ``(model, preprocess_cfg, tokenizer)``: the model in eval mode on CPU (fp32), the preprocessing
    parameters (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``) and open_clip's tokenizer,
    which maps a list of strings to ``(N, 16)`` int64 token ids.
    """
    import open_clip  # lazy: optional heavy import

    folder = Path(path)
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"load_tiny_open_clip: {config_path} not found (build it with make_tiny_open_clip)"
        )
    if not (folder / "open_clip_model.safetensors").is_file():
        raise FileNotFoundError(
            f"load_tiny_open_clip: weights {folder / 'open_clip_model.safetensors'} not found"
        )
    model = open_clip.create_model(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    preprocess_cfg = json.loads(config_path.read_text(encoding="utf-8")).get("preprocess_cfg", {})
    return model, preprocess_cfg, tokenizer


# --------------------------------------------------------------------------------------------------
# cache

TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": make_tiny_llava,
    "qwen2vl": make_tiny_qwen2vl,
    "llava_next": make_tiny_llava_next,
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
    "idefics3": make_tiny_idefics3,
    "smolvlm": make_tiny_smolvlm,
    "causal_lm": make_tiny_causal_lm,
    "sd": make_tiny_sd,
    "sdxl": make_tiny_sdxl,
    "sd3": make_tiny_sd3,
    "flux": make_tiny_flux,
    "open_clip": make_tiny_open_clip,
}

_MEMO: dict[str, Path] = {}


def _cache_root() -> Path:
    env = os.environ.get("MMALIGN_TINY_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "mmalign-tiny-cache"


def _cache_key(name: str, kwargs: dict[str, Any]) -> str:
    """Name + kwargs + a digest of this file and the library versions, so stale builds are never reused."""
    import diffusers
    import transformers

    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(f"{torch.__version__}|{transformers.__version__}|{diffusers.__version__}".encode())
    digest.update(json.dumps(kwargs, sort_keys=True, default=str).encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def cached_tiny(name: str, **kw: Any) -> Path:
    """Build tiny model ``name`` (a key of :data:`TINY_BUILDERS`) once and return its folder.

    The folder lives under ``$MMALIGN_TINY_CACHE`` (default ``<system temp>/mmalign-tiny-cache``), keyed by
    the name, the keyword arguments and a digest of this module and the library versions. A build goes to
    a private temporary folder that is renamed into place atomically, so concurrent processes (pytest-xdist
    workers) never see a half-written model; a process that loses the race discards its copy. Treat the
    returned folder as read-only: copy it before modifying or training in place.
    """
    if name not in TINY_BUILDERS:
        raise KeyError(f"cached_tiny: unknown tiny model {name!r}; known: {sorted(TINY_BUILDERS)}")
    key = _cache_key(name, kw)
    if key in _MEMO and _MEMO[key].is_dir():
        return _MEMO[key]
    root = _cache_root()
    final = root / key
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            TINY_BUILDERS[name](staging, **kw)
            honour_umask(staging)  # shared by every user of the machine's cache
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # the rename failed for a reason other than losing the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _MEMO[key] = final
    return final


# --------------------------------------------------------------------------------------------------
# video LLMs

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


TINY_BUILDERS["llava_next_video"] = make_tiny_llava_next_video
TINY_BUILDERS["llava_onevision"] = make_tiny_llava_onevision
__all__ += ["LLAVA_VIDEO_FRAME_TOKENS", "make_tiny_llava_next_video", "make_tiny_llava_onevision"]
