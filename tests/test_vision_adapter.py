"""VLMAdapter on tiny LLaVA and tiny Qwen2-VL: log-probs against a brute-force loop, shared-image
encoding, per-side images, truncation that keeps image tokens, and bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.logprobs import sequence_logps
from mmalign.pairs import PreferencePair
from vision.adapter import VLMAdapter, render_prompt


def _tiny(name: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign import tiny

    if name not in tiny.TINY_BUILDERS:
        pytest.skip(f"mmalign.tiny has no {name!r} builder yet")
    path = tiny.cached_tiny(name)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def family(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, object]:
    """(model, processor) in eval mode, read-only: tiny LLaVA is the session's shared ``tiny_llava``."""
    if request.param == "llava":
        return request.getfixturevalue("tiny_llava")
    return _tiny(request.param)


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 10 * i, 50, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture()
def folder_pairs(tmp_path):  # noqa: ANN001, ANN201
    """Three pairs in a dataset folder: shared image, different images, rejected_media left empty."""
    paths = []
    for i, img in enumerate(_images()):
        (tmp_path / "media").mkdir(exist_ok=True)
        img.save(tmp_path / "media" / f"{i}.png")
        paths.append(f"media/{i}.png")
    pairs = [
        PreferencePair("a", "describe the image", "a red cube on the table", "a blue dog", [paths[0]], [paths[0]]),
        PreferencePair("b", "what is this", "a cat", "the sky is green and a car", [paths[1]], [paths[2]]),
        PreferencePair("c", "<image>\ndescribe", "yes", "no", [paths[2]], []),
    ]
    return tmp_path, pairs


def _brute(model, processor, pair, side: str, root) -> float:  # noqa: ANN001
    """One sequence at a time, no padding, pixels through the model's own forward."""
    media = getattr(pair, f"{side}_media") or pair.chosen_media
    images = [Image.open(root / m).convert("RGB") for m in media]
    text = render_prompt(processor, pair.prompt, len(images))
    out = processor(text=[text], images=[images], return_tensors="pt")
    response = processor.tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"]
    response = response + [processor.tokenizer.eos_token_id]
    ids = torch.cat([out["input_ids"], torch.tensor([response])], dim=1)
    kwargs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in kwargs:
        pad = torch.zeros(1, len(response), dtype=kwargs["mm_token_type_ids"].dtype)
        kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], pad], dim=1)
    labels = ids.clone()
    labels[:, : out["input_ids"].shape[1]] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits
    return float(sequence_logps(logits, labels)[0][0])


def assert_equals_brute_force(out, model, processor, pairs, root) -> None:  # noqa: ANN001
    """``out``, the adapter's log-probs of ``pairs``, equals :func:`_brute` on every pair and side within 1e-5."""
    expected_chosen = torch.tensor([_brute(model, processor, p, "chosen", root) for p in pairs])
    expected_rejected = torch.tensor([_brute(model, processor, p, "rejected", root) for p in pairs])
    torch.testing.assert_close(out.chosen, expected_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected, expected_rejected, atol=1e-5, rtol=0)


def check_logps_equal_brute_force(model, processor, root, pairs, *, share: bool = True) -> None:  # noqa: ANN001
    """One collated batch of ``pairs`` (2 rows each) through the adapter equals brute force; the chosen token
    counts are the response tokens + eos. Shared by this file's and tests/test_vision_families.py's test."""
    adapter = VLMAdapter(processor, media_root=root, share_image_encoding=share)
    adapter.check_model(model)
    batch = adapter.collate(pairs)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    with torch.no_grad():
        out = adapter.logps(model, batch)
    assert_equals_brute_force(out, model, processor, pairs, root)
    tok = processor.tokenizer
    counts = [len(tok(p.chosen, add_special_tokens=False)["input_ids"]) + 1 for p in pairs]
    assert out.chosen_tokens.tolist() == counts


def check_other_rejected_image_changes_rejected_logps(model, processor, root, pair, media: str) -> None:  # noqa: ANN001
    """``pair`` with ``media`` as its rejected image: the chosen log-prob stays bitwise equal, the rejected one moves."""
    other = PreferencePair(pair.id, pair.prompt, pair.chosen, pair.rejected, pair.chosen_media, [media])
    adapter = VLMAdapter(processor, media_root=root)
    with torch.no_grad():
        a = adapter.logps(model, adapter.collate([pair]))
        b = adapter.logps(model, adapter.collate([other]))
    assert torch.equal(a.chosen, b.chosen)
    assert abs(float(a.rejected[0] - b.rejected[0])) > 1e-4


@pytest.mark.parametrize("share", [True, False])
def test_logps_equal_brute_force(family, folder_pairs, share: bool) -> None:  # noqa: ANN001
    model, processor = family
    root, pairs = folder_pairs
    check_logps_equal_brute_force(model, processor, root, pairs, share=share)


def test_shared_path_encodes_each_image_once(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    """3 pairs, 4 distinct (prompt, image) units -> 4 images through the vision tower, not 6;
    log-probs equal the naive path within 1e-5."""
    model, processor = tiny_llava
    root, pairs = folder_pairs
    seen: list[int] = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda m, args, kw: seen.append(
        (args[0] if args else kw["pixel_values"]).shape[0]), with_kwargs=True)
    try:
        results = {}
        for share in (True, False):
            seen.clear()
            adapter = VLMAdapter(processor, media_root=root, share_image_encoding=share)
            with torch.no_grad():
                results[share] = adapter.logps(model, adapter.collate(pairs))
            results[(share, "images")] = sum(seen)
    finally:
        hook.remove()
    assert results[(True, "images")] == 4
    assert results[(False, "images")] == 6
    torch.testing.assert_close(results[True].chosen, results[False].chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[True].rejected, results[False].rejected, atol=1e-5, rtol=0)


def test_different_rejected_image_changes_rejected_logps(family, folder_pairs) -> None:  # noqa: ANN001
    model, processor = family
    root, pairs = folder_pairs
    check_other_rejected_image_changes_rejected_logps(model, processor, root, pairs[0], "media/1.png")


def test_truncation_cuts_response_never_image_tokens(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    root, pairs = folder_pairs
    full = VLMAdapter(processor, media_root=root).collate(pairs[:1])
    prompt_len = int((full["labels"][0] == -100).sum())  # prompt tokens of the chosen row (no padding there)
    adapter = VLMAdapter(processor, media_root=root, max_length=prompt_len + 3)
    batch = adapter.collate(pairs[:1])
    image_id = adapter.image_token_id
    assert (batch["input_ids"] == image_id).sum(-1).tolist() == [16, 16]  # all image tokens kept
    assert batch["attention_mask"].sum(-1).tolist() == [prompt_len + 3, prompt_len + 3]
    with torch.no_grad():
        out = adapter.logps(model, batch)
    assert out.chosen_tokens.tolist() == [3] and out.rejected_tokens.tolist() == [3]

    dropper = VLMAdapter(processor, media_root=root, max_length=prompt_len + 3, truncation="drop")
    kept, reasons = dropper.filter_pairs(pairs)
    assert reasons["response_exceeds_max_length"] >= 1 and len(kept) + sum(reasons.values()) == 3
    with pytest.raises(ValueError, match="dropped as too long"):
        dropper.collate(pairs[:1])
    assert dropper.dropped["response_exceeds_max_length"] == 1

    tiny = VLMAdapter(processor, media_root=root, max_length=10)  # prompt alone (16 image tokens) too long
    kept, reasons = tiny.filter_pairs(pairs)
    assert kept == [] and reasons == {"prompt_exceeds_max_length": 3}


def test_weight_from_meta(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    """Per-pair weights are set by the core (mmalign.engine.collate_pairs) for every adapter."""
    from mmalign.engine import collate_pairs

    _, processor = tiny_llava
    root, pairs = folder_pairs
    pairs[1].meta["weight"] = 0.25
    batch = collate_pairs(VLMAdapter(processor, media_root=root), list(enumerate(pairs)))
    assert batch["weight"].tolist() == [1.0, 0.25, 1.0] and batch["index"].tolist() == [0, 1, 2]


def test_grayscale_image_is_converted(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    Image.fromarray(np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)).save(tmp_path / "gray.png")
    pair = PreferencePair("g", "describe", "a cube", "a dog", ["gray.png"], [])
    adapter = VLMAdapter(processor, media_root=tmp_path)
    with torch.no_grad():
        out = adapter.logps(model, adapter.collate([pair]))
    assert torch.isfinite(out.chosen).all()


def test_unreadable_image_names_pair_and_field(tiny_llava, tmp_path) -> None:  # noqa: ANN001
    _, processor = tiny_llava
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    pair = PreferencePair("p7", "describe", "a cube", "a dog", ["ok.png"], ["bad.jpg"])
    with pytest.raises(ValueError, match=r"p7.*rejected_media.*bad\.jpg"):
        VLMAdapter(processor, media_root=tmp_path).collate([pair])


def test_chat_template_without_image_slot(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    _, processor = tiny_llava
    root, pairs = folder_pairs
    broken = copy.deepcopy(processor)
    broken.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="no image slot"):
        VLMAdapter(broken, media_root=root).collate(pairs)
    # a plain prompt_template with the slot works instead
    adapter = VLMAdapter(broken, media_root=root, prompt_template="USER: <image>\n{prompt} ASSISTANT:")
    assert adapter.collate(pairs)["input_ids"].shape[0] == 6


def test_processor_model_mismatch(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    model, processor = tiny_llava
    root, pairs = folder_pairs
    wrong = copy.deepcopy(processor)
    wrong.patch_size = 4  # expands <image> to 64 tokens; the model gives 16 features per image
    for share in (True, False):
        adapter = VLMAdapter(wrong, media_root=root, share_image_encoding=share)
        with pytest.raises(ValueError, match="processor/model mismatch"), torch.no_grad():
            adapter.logps(model, adapter.collate(pairs))
    other = copy.deepcopy(model)
    other.config.image_token_id = 3
    with pytest.raises(ValueError, match="processor/model mismatch"):
        VLMAdapter(processor).check_model(other)


def test_dpo_step_raises_margin(tiny_llava, folder_pairs) -> None:  # noqa: ANN001
    """A few SGD steps on the DPO loss through the adapter raise the chosen-minus-rejected margin."""
    from mmalign.losses import dpo

    model, processor = tiny_llava
    root, pairs = folder_pairs
    policy = copy.deepcopy(model).train()
    adapter = VLMAdapter(processor, media_root=root)
    batch = adapter.collate(pairs)
    with torch.no_grad():
        ref = adapter.logps(model, batch)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(3):
        out = adapter.logps(policy, batch)
        loss = dpo(out.chosen, out.rejected, ref.chosen, ref.rejected, beta=0.1).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = adapter.logps(policy, batch)
    assert float((after.chosen - after.rejected).mean()) > float((ref.chosen - ref.rejected).mean())


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_fused_head_equals_full_logits_in_values_and_gradients(family, folder_pairs) -> None:  # noqa: ANN001
    """The default path never makes the (2B, T, V) logits; it must give the full-logits values and gradients."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.tiny import cached_tiny

    root, pairs = folder_pairs
    path = cached_tiny(family)
    processor = AutoProcessor.from_pretrained(path)
    results = {}
    for fused in (True, False):
        model = AutoModelForImageTextToText.from_pretrained(path).double()
        adapter = VLMAdapter(processor, media_root=root, fused_head=fused)
        batch = adapter.collate(pairs)
        batch = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in batch.items()}
        out = adapter.logps(model, batch)
        (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
        results[fused] = (out.chosen.detach(), out.rejected.detach(),
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (c1, r1, g1), (c0, r0, g0) = results[True], results[False]
    torch.testing.assert_close(c1, c0)
    torch.testing.assert_close(r1, r0)
    assert g1.keys() == g0.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-10, rtol=1e-8, msg=name)
