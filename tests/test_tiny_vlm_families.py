"""The tiny LLaVA-NeXT, Qwen2.5-VL, Idefics3 and SmolVLM builders of mmalign.tiny: they save, load back
through ``AutoModelForImageTextToText`` / ``AutoProcessor``, expand image tokens as documented, run forward
and ``generate`` (determinism and size: tests/test_tiny.py, for every registered builder). SmolVLM's
processor needs the ``num2words`` package; its cases are skipped where that is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign import tiny

_NEEDS_NUM2WORDS = pytest.mark.skipif(
    importlib.util.find_spec("num2words") is None, reason="SmolVLMProcessor needs the num2words package"
)


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _load(path: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(path)


def _prompt(processor: object) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[attr-defined]


def _forward_and_generate(model: torch.nn.Module, processor: object, inputs: dict) -> None:
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))  # type: ignore[attr-defined]
    assert torch.isfinite(logits).all()
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 3)


def test_llava_next_anyres_tiles_and_tokens(tmp_path: Path) -> None:
    """Image tokens = base 16 + unpadded grid + one newline per grid row (CLS dropped):
    40x50 (h x w) -> pinpoint 32x64 (scale min(64/50, 32/40) = 0.8, the largest effective area): grid 4x8
    features, the 50/40 aspect keeps round(50 * 4/40) = 5 columns, padding (8 - 5) // 2 = 1 each side
    -> 4 x 6 = 24 + 4 newlines + 16 = 44, and 1 base + 2 tiles = 3 tiles.
    50x50 -> pinpoint 32x32 (ties 32x64 on area, less waste): 16 + 4 x 4 + 4 = 36, 2 tiles.
    70x40 -> pinpoint 64x32: grid 8x4, round(70 * 4/40) = 7 rows but padding (8 - 7) // 2 = 0 keeps 8
    -> 8 x 4 + 8 + 16 = 56, 3 tiles."""
    path = tiny.make_tiny_llava_next(tmp_path / "next")
    model, processor = _load(path)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32]]
    prompt = _prompt(processor)
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"
    image_id = model.config.image_token_id
    for (h, w), n_tokens, n_tiles in [((40, 50), 44, 3), ((50, 50), 36, 2), ((70, 40), 56, 3)]:
        inputs = processor(text=[prompt], images=[_photo(h, w)], return_tensors="pt")
        assert inputs["image_sizes"].tolist() == [[h, w]]
        assert inputs["pixel_values"].shape == (1, n_tiles, 3, 32, 32)
        assert int((inputs["input_ids"] == image_id).sum()) == n_tokens
    # two images of different tile counts in one batch: pixel_values padded to 3 tiles
    inputs = processor(
        text=[prompt, prompt], images=[_photo(40, 50), _photo(50, 50, seed=1)], return_tensors="pt", padding=True
    )
    assert inputs["pixel_values"].shape == (2, 3, 3, 32, 32)
    _forward_and_generate(model, processor, inputs)


def test_qwen2_5_vl_window_and_full_attention(tmp_path: Path) -> None:
    """smart_resize: 40x50 rounds to 28x56 = 1568 px < min_pixels 3136, so it scales by sqrt(3136 / 2000)
    = 1.252 and rounds up to multiples of 28: ceil(50.1 / 28) * 28 = 56 by ceil(62.6 / 28) * 28 = 84 -> 4x6
    patches of 14, 2x2 merge -> 6 tokens; 512x512 -> 112x112 (max_pixels) -> 8x8 patches -> 16 tokens."""
    path = tiny.make_tiny_qwen2_5_vl(tmp_path / "qwen25")
    model, processor = _load(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    vision = model.config.vision_config
    assert (vision.window_size, list(vision.fullatt_block_indexes), vision.depth) == (56, [1], 2)
    prompt = _prompt(processor)
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")
    for (h, w), grid, n_tokens in [((40, 50), [1, 4, 6], 6), ((512, 512), [1, 8, 8], 16)]:
        inputs = processor(text=[prompt], images=[_photo(h, w)], return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [grid]
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_tokens
    _forward_and_generate(model, processor, inputs)
    # the window path matters: with every block on full attention the 8x8-patch image encodes differently
    with torch.no_grad():
        windowed = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        model.model.visual.fullatt_block_indexes = [0, 1]
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    assert windowed.shape == full.shape == (16, 32)
    assert not torch.allclose(windowed, full, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "model_type", "prompt_expected"),
    [
        ("idefics3", "Idefics3", "User:<image> What is this?<end_of_utterance>\nAssistant:"),
        pytest.param(
            "smolvlm",
            "SmolVLM",
            "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:",
            marks=_NEEDS_NUM2WORDS,
        ),
    ],
)
def test_idefics3_design_tiles_and_markers(tmp_path: Path, name: str, model_type: str, prompt_expected: str) -> None:
    """Idefics3 and SmolVLM (own classes, model types "idefics3" / "smolvlm"): 4 tokens per 32x32 tile
    ((32/8)^2 = 16 patches / 2^2 pixel shuffle). 40x50 -> longest edge 64 -> 51x64 -> rounded up to 64x64 ->
    2x2 tiles + global = 5 tiles = 20 tokens; 30x90 -> 21x64 -> 32x64 -> 1x2 + 1 = 3 tiles = 12 tokens."""
    path = tiny.TINY_BUILDERS[name](tmp_path / name)
    model, processor = _load(path)
    assert model.config.model_type == name
    assert type(model).__name__ == f"{model_type}ForConditionalGeneration"
    assert type(processor).__name__ == f"{model_type}Processor"
    assert tiny.IDEFICS3_IMAGE_SEQ_LEN == processor.image_seq_len == 4
    prompt = _prompt(processor)
    assert prompt == prompt_expected
    tok = processor.tokenizer
    marker_ids = [tok.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>", "<global-img>", "<row_2_col_2>")]
    assert len(set(marker_ids)) == 3 and all(i is not None and i != tok.unk_token_id for i in marker_ids)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<end_of_utterance>")
    image_id = model.config.image_token_id
    for (h, w), n_tiles in [((40, 50), 5), ((30, 90), 3)]:
        inputs = processor(text=[prompt], images=[[_photo(h, w)]], return_tensors="pt")
        assert inputs["pixel_values"].shape == (1, n_tiles, 3, 32, 32)
        assert int((inputs["input_ids"] == image_id).sum()) == 4 * n_tiles
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(marker_ids[1]) == 1  # one global view
        assert (marker_ids[2] in ids) == (n_tiles == 5)
    # one prompt per row, different tile counts: the 3-tile sample is padded with all-zero tiles
    inputs = processor(
        text=[prompt, prompt], images=[[_photo(40, 50)], [_photo(30, 90)]], return_tensors="pt", padding=True
    )
    assert inputs["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert float(inputs["pixel_values"][1, 3:].abs().sum()) == 0.0
    _forward_and_generate(model, processor, inputs)


@pytest.mark.parametrize(
    "name", ["llava_next", "qwen2_5_vl", "idefics3", pytest.param("smolvlm", marks=_NEEDS_NUM2WORDS)]
)
def test_registered_and_cached(name: str) -> None:
    assert name in tiny.TINY_BUILDERS
    path = tiny.cached_tiny(name)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert tiny.cached_tiny(name) == path
