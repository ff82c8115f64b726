"""VLM training reads each image once before training: ``filter_pairs`` measures lengths from image sizes
read from the headers (blank images of the same size give the same image tokens), decoding nothing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmalign.pairs.media as media
from mmalign.pairs import PreferencePair, image_size
from vision.adapter import VLMAdapter

FAMILIES = ["llava", "llava_next", "qwen2vl"]


def test_image_size_applies_exif_orientation(tmp_path) -> None:  # noqa: ANN001
    img = Image.new("RGB", (40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 20 wide, 40 high
    img.save(tmp_path / "r.jpg", exif=exif)
    img.save(tmp_path / "p.png")
    assert image_size(tmp_path / "r.jpg") == (20, 40) == media.load_image(tmp_path / "r.jpg").size
    assert image_size(tmp_path / "p.png") == (40, 20)
    with pytest.raises(media.MediaError, match="missing.png"):
        image_size(tmp_path / "missing.png")


@pytest.mark.parametrize("name", FAMILIES)
def test_filter_pairs_decodes_nothing_and_matches_the_decoded_lengths(name, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from transformers import AutoProcessor

    from mmalign.tiny import cached_tiny

    processor = AutoProcessor.from_pretrained(cached_tiny(name))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i, (w, h) in enumerate([(40, 40), (90, 30), (30, 70), (64, 48)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        pairs.append(PreferencePair(f"p{i}", "describe the image", "a red cube " * (3 + 6 * i), "a dog",
                                    [f"{i}.png"], [f"{(i + 1) % 4}.png"] if i % 2 else []))
    adapter = VLMAdapter(processor, media_root=tmp_path, max_length=None)
    full = adapter.collate(pairs)
    # a max_length between the pairs' lengths drops some and keeps others
    lengths = full["attention_mask"].sum(-1).tolist()
    limit = sorted(lengths)[len(lengths) // 2]
    b = len(pairs)  # from the decoded batch: a pair fits when both its rows do
    expected = [p.id for i, p in enumerate(pairs) if lengths[i] <= limit and lengths[b + i] <= limit]

    def no_decoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("filter_pairs decoded an image")

    monkeypatch.setattr(media, "load_image", no_decoding)
    monkeypatch.setattr("mmalign.pairs.load_image", no_decoding)
    kept, reasons = VLMAdapter(processor, media_root=tmp_path, max_length=limit, truncation="drop").filter_pairs(pairs)
    assert [p.id for p in kept] == expected and 0 < len(kept) < len(pairs)
    assert sum(reasons.values()) == len(pairs) - len(kept)
