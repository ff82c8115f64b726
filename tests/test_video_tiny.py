"""The tiny video-LLM builders of mmalign.tiny: registered for ``tiny:`` names, and their processors expand
``<video>`` to the number of features the model gives (4 per frame, + 1 for OneVision)."""

from __future__ import annotations

import pytest
import torch

from mmalign import tiny


@pytest.mark.parametrize("name", ["llava_next_video", "llava_onevision"])
def test_registered_and_cached(name: str) -> None:
    """Registered for ``tiny:`` names (determinism and size: tests/test_tiny.py, for every builder)."""
    path = tiny.cached_tiny(name)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert tiny.cached_tiny(name) == path


@pytest.mark.parametrize(("name", "tokens"), [("llava_next_video", 6 * 4), ("llava_onevision", 6 * 4 + 1)])
def test_video_tokens_match_features(name: str, tokens: int) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny.cached_tiny(name)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text == "USER: <video>\nwhat moves ASSISTANT:"
    inputs = processor(text=[text], videos=[torch.zeros(6, 3, 40, 56, dtype=torch.uint8)], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == tokens
    assert inputs["pixel_values_videos"].shape == (1, 6, 3, tiny.LLAVA_IMAGE_SIZE, tiny.LLAVA_IMAGE_SIZE)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
