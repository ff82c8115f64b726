"""VLMAdapter on the tiny LLaVA-NeXT, Qwen2.5-VL, Idefics3 and SmolVLM models: log-probs against a brute-force
loop, shared-image encoding against the naive path, per-side images, truncation that keeps image tokens.

The brute force and the image set come from tests/test_vision_adapter.py (LLaVA-1.5 / Qwen2-VL); the pairs
here add an image of another shape so that a batch mixes tile counts (LLaVA-NeXT: 2 or 3 anyres tiles,
padded; Idefics3 and SmolVLM: 3 or 5 tiles, all-zero padding tiles; Qwen2.5-VL: different patch grids).
SmolVLM's processor needs the ``num2words`` package; its cases are skipped where that is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_vision_adapter import (
    _images,
    assert_equals_brute_force,
    check_logps_equal_brute_force,
    check_other_rejected_image_changes_rejected_logps,
)

from mmalign.pairs import PreferencePair
from vision.adapter import VLMAdapter

_NEEDS_NUM2WORDS = pytest.mark.skipif(
    importlib.util.find_spec("num2words") is None, reason="SmolVLMProcessor needs the num2words package"
)
FAMILIES = ["llava_next", "qwen2_5_vl", "idefics3", pytest.param("smolvlm", marks=_NEEDS_NUM2WORDS)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign import tiny

    path = tiny.cached_tiny(request.param)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
    return request.param, model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PreferencePair]]:
    """Images 40x50, 50x50, 60x50 (the adapter test's) and a wide 30x90; three pairs: a shared image, a
    different rejected image of another shape, rejected_media left empty (= the chosen image)."""
    root = tmp_path_factory.mktemp("families")
    (root / "media").mkdir()
    images = _images(3) + [Image.fromarray((torch.rand(30, 90, 3) * 255).to(torch.uint8).numpy())]
    for i, img in enumerate(images):
        img.save(root / "media" / f"{i}.png")
    pairs = [
        PreferencePair("a", "describe the image", "a red cube on the table", "a blue dog", ["media/0.png"], ["media/0.png"]),
        PreferencePair("b", "what is this", "a cat", "the sky is green and a car", ["media/1.png"], ["media/3.png"]),
        PreferencePair("c", "describe", "yes", "no", ["media/3.png"], []),
    ]
    return root, pairs


def _vision_rows(name: str, model: torch.nn.Module) -> tuple[torch.nn.Module, list[int]]:
    """The vision encoder module and a list its forward pre-hook fills with the rows (tiles or patches) seen."""
    base = model.model
    module = {
        "llava_next": "vision_tower",
        "qwen2_5_vl": "visual",
        "idefics3": "vision_model",
        "smolvlm": "vision_model",
    }[name]
    return getattr(base, module), []


def test_logps_equal_brute_force(family, pairs_folder) -> None:  # noqa: ANN001
    """Shared encoding (default) against one unpadded sequence at a time through the model's own forward."""
    _, model, processor = family
    root, pairs = pairs_folder
    check_logps_equal_brute_force(model, processor, root, pairs)


def test_shared_path_equals_naive_and_encodes_less(family, pairs_folder) -> None:  # noqa: ANN001
    """3 pairs, 4 distinct (prompt, image) units instead of 6 rows; the log-probs equal the naive path's
    within 1e-5, and the vision encoder sees only the units' rows (tiles or patches):

    * LLaVA-NeXT tiles (base + anyres): 40x50 -> 3, 50x50 -> 2 (pinpoint 32x32), 30x90 -> 3 (32x64).
      Shared: units a, b-chosen, b-rejected, c = 3 + 2 + 3 + 3 = 11; naive: 2*3 + (2 + 3) + 2*3 = 17.
    * Qwen2.5-VL 14-px patches: 40x50 -> 56x84 = 24, 50x50 -> 56x56 = 16, 30x90 -> 56x112 = 32 (scaled up
      by sqrt(3136 / 2700) to reach min_pixels). Shared 24 + 16 + 32 + 32 = 104; naive 48 + 48 + 64 = 160.
    * Idefics3 and SmolVLM tiles: 40x50 and 50x50 -> 2x2 + global = 5, 30x90 -> 1x2 + global = 3.
      Shared 5 + 5 + 3 + 3 = 16; naive 10 + 8 + 6 = 24.
    """
    name, model, processor = family
    root, pairs = pairs_folder
    encoder, seen = _vision_rows(name, model)

    def count(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        seen.append(int(first.shape[0]))

    hook = encoder.register_forward_pre_hook(count, with_kwargs=True)
    results = {}
    try:
        for share in (True, False):
            seen.clear()
            adapter = VLMAdapter(processor, media_root=root, share_image_encoding=share)
            batch = adapter.collate(pairs)
            assert batch["row_units"].tolist() == ([0, 1, 3, 0, 2, 3] if share else list(range(6)))
            with torch.no_grad():
                results[share] = adapter.logps(model, batch)
            results[(share, "rows")] = sum(seen)
    finally:
        hook.remove()
    expected_rows = {
        "llava_next": (11, 17),
        "qwen2_5_vl": (104, 160),
        "idefics3": (16, 24),
        "smolvlm": (16, 24),
    }[name]
    assert (results[(True, "rows")], results[(False, "rows")]) == expected_rows
    torch.testing.assert_close(results[True].chosen, results[False].chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[True].rejected, results[False].rejected, atol=1e-5, rtol=0)


def test_different_rejected_image_changes_rejected_logps(family, pairs_folder) -> None:  # noqa: ANN001
    _, model, processor = family
    root, pairs = pairs_folder
    check_other_rejected_image_changes_rejected_logps(model, processor, root, pairs[0], "media/2.png")


def test_truncation_keeps_every_image_token(family, pairs_folder) -> None:  # noqa: ANN001
    """Pair b (50x50 chosen image, 30x90 rejected image: different image-token counts in every family) with
    max_length = longer prompt + 2: both rows keep all their image tokens, responses are cut to what fits
    (the longer-prompt row to 2 tokens); a 10-token budget is shorter than every prompt and drops all pairs."""
    _, model, processor = family
    root, pairs = pairs_folder
    full = VLMAdapter(processor, media_root=root).collate(pairs[1:2])
    lengths = full["attention_mask"].sum(-1)
    response_lens = (full["labels"] != -100).sum(-1)
    prompt_lens = (lengths - response_lens).tolist()
    image_id = VLMAdapter(processor).image_token_id
    n_image = (full["input_ids"] == image_id).sum(-1).tolist()
    assert n_image[0] != n_image[1] and min(n_image) >= 4

    budget = max(prompt_lens) + 2
    kept_lens = [min(budget - p, int(r)) for p, r in zip(prompt_lens, response_lens, strict=True)]
    assert kept_lens[prompt_lens.index(max(prompt_lens))] == 2  # that row's response is really cut
    adapter = VLMAdapter(processor, media_root=root, max_length=budget)
    batch = adapter.collate(pairs[1:2])
    assert (batch["input_ids"] == image_id).sum(-1).tolist() == n_image
    assert batch["attention_mask"].sum(-1).tolist() == [p + k for p, k in zip(prompt_lens, kept_lens, strict=True)]
    with torch.no_grad():
        out = adapter.logps(model, batch)
    assert [int(out.chosen_tokens[0]), int(out.rejected_tokens[0])] == kept_lens
    assert torch.isfinite(out.chosen).all() and torch.isfinite(out.rejected).all()

    kept, reasons = VLMAdapter(processor, media_root=root, max_length=10).filter_pairs(pairs)
    assert kept == [] and reasons == {"prompt_exceeds_max_length": 3}


def test_dropped_pair_leaves_the_others_exact(family, pairs_folder) -> None:  # noqa: ANN001
    """truncation="drop" removes an over-long pair from the middle of the batch; its two units (images 60x50
    and 50x50, used by no other pair) are cut out of the processor's image tensors (Qwen's flattened
    patches, LLaVA-NeXT's and Idefics3's padded tile stacks), and the kept pairs still equal brute force."""
    _, model, processor = family
    root, pairs = pairs_folder
    long = PreferencePair("d", "what is this", "a cat", " ".join(["red cube"] * 30), ["media/2.png"], ["media/1.png"])
    kept_pairs = [pairs[0], pairs[2]]
    fits = VLMAdapter(processor, media_root=root).collate(kept_pairs)
    adapter = VLMAdapter(processor, media_root=root, max_length=int(fits["attention_mask"].sum(-1).max()),
                         truncation="drop")
    batch = adapter.collate([pairs[0], long, pairs[2]])
    assert batch["ids"] == ["a", "c"] and adapter.dropped == {"response_exceeds_max_length": 1}
    assert batch["row_units"].tolist() == [0, 1, 0, 1]
    with torch.no_grad():
        out = adapter.logps(model, batch)
    assert_equals_brute_force(out, model, processor, kept_pairs, root)


@pytest.mark.parametrize("share", [True, False])
def test_multi_image_pairs_equal_brute_force(family, pairs_folder, share: bool) -> None:  # noqa: ANN001
    """Two images per prompt next to a one-image pair (units of 2, 2, 1 and 2 images): LLaVA-NeXT's per-image
    ``image_sizes``, Qwen's per-image ``image_grid_thw`` and Idefics3's per-sample tile stacks stay aligned."""
    _, model, processor = family
    root, _ = pairs_folder
    pairs = [
        PreferencePair("m", "compare", "a cat", "a dog", ["media/0.png", "media/1.png"], ["media/0.png", "media/3.png"]),
        PreferencePair("s", "describe", "yes", "no", ["media/2.png"], []),
        PreferencePair("n", "compare", "a red cube", "a blue car", ["media/3.png", "media/2.png"], []),
    ]
    adapter = VLMAdapter(processor, media_root=root, share_image_encoding=share)
    with torch.no_grad():
        out = adapter.logps(model, adapter.collate(pairs))
    assert_equals_brute_force(out, model, processor, pairs, root)
