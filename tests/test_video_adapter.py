"""VideoLLMAdapter on tiny LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL: log-probs against a brute-force
per-sequence computation, one encoding per shared video, different frames per side, truncation that keeps
every video token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.logprobs import sequence_logps
from mmalign.pairs import PreferencePair
from video.adapter import VideoLLMAdapter, render_video_prompt
from video.frames import FrameSampling, load_clip, write_video
from video.synthetic import moving_square_clip

pytest.importorskip("av")

FAMILIES = ["llava_next_video", "llava_onevision", "qwen2vl", "qwen2_5_vl"]


def load_tiny(name: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.tiny import cached_tiny

    path = cached_tiny(name)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, object]:
    return (request.param, *load_tiny(request.param))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "media" / "red.mp4", moving_square_clip(12, size=(32, 48)), fps=12)
    write_video(root / "media" / "blue.mp4", moving_square_clip(12, size=(32, 48), color=(0, 0, 255)), fps=12)
    return root


def _pairs() -> list[PreferencePair]:
    red, blue = ["media/red.mp4"], ["media/blue.mp4"]
    return [
        PreferencePair("shared", "what moves in the video", "a red cube moves right", "a blue dog", red, red),
        PreferencePair("other", "<video>\ndescribe the video", "a red square", "the sky is green", red, blue),
        PreferencePair("fewer", "what is shown", "yes", "no answer here", red, red,
                       meta={"sampling": {"rejected": {"num_frames": 2}}}),
    ]


def _brute(model, processor, root: Path, pair: PreferencePair, side: str, sampling: FrameSampling) -> float:  # noqa: ANN001
    """One sequence, no padding, the pixels through the model's own forward (no shared features)."""
    override = pair.meta.get("sampling", {}).get(side)
    clip = load_clip(root / getattr(pair, f"{side}_media")[0], FrameSampling(**override) if override else sampling)
    text = render_video_prompt(processor, pair.prompt)
    out = processor(text=[text], videos=[clip.frames], video_metadata=[clip.metadata()], return_tensors="pt")
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


def test_logps_equal_brute_force(family, clips: Path) -> None:  # noqa: ANN001
    name, model, processor = family
    sampling = FrameSampling(num_frames=4)
    adapter = VideoLLMAdapter(processor, media_root=clips, sampling=sampling)
    adapter.check_model(model)
    pairs = [p.with_root(clips) for p in _pairs()]
    batch = adapter.collate(pairs)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    assert len(batch["video_inputs"]) == 3  # red at 4 frames (5 rows, 3 prompts), blue, red at 2 frames
    with torch.no_grad():
        out = adapter.logps(model, batch)
    for side in ("chosen", "rejected"):
        expected = torch.tensor([_brute(model, processor, clips, p, side, sampling) for p in pairs])
        torch.testing.assert_close(getattr(out, side), expected, atol=1e-5, rtol=0)
    tok = processor.tokenizer
    assert out.chosen_tokens.tolist() == [len(tok(p.chosen, add_special_tokens=False)["input_ids"]) + 1 for p in pairs]
    assert adapter.cache.misses == 3 and adapter.cache.stats.videos == 3  # red@4, blue@4, red@2: each decoded once


def test_shared_video_encoded_once(clips: Path) -> None:
    model, processor = load_tiny("llava_next_video")
    adapter = VideoLLMAdapter(processor, media_root=clips, sampling=FrameSampling(num_frames=4))
    calls: list[int] = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            adapter.logps(model, adapter.collate([p.with_root(clips) for p in _pairs()[:1]]))
    finally:
        handle.remove()
    assert calls == [4]  # one clip of 4 frames through the vision tower for both rows
    adapter.collate([p.with_root(clips) for p in _pairs()])
    adapter.collate([p.with_root(clips) for p in _pairs()])
    assert adapter.cache.stats.videos == 3  # a second pass decodes nothing


def test_truncation_keeps_every_video_token(clips: Path) -> None:
    model, processor = load_tiny("qwen2_5_vl")
    pair = _pairs()[0].with_root(clips)
    sampling = FrameSampling(num_frames=4)
    full = VideoLLMAdapter(processor, media_root=clips, sampling=sampling).collate([pair])
    # 4 of 12 frames of a 12 fps clip: sampled at 4 fps, a temporal patch of 2 frames spans 0.5 s
    assert full["video_inputs"][0]["second_per_grid_ts"].tolist() == [0.5]
    prompt_len = int(full["attention_mask"][0].sum() - (full["labels"][0] != -100).sum())
    n_video = int(full["video_tokens"][0])
    cut = VideoLLMAdapter(processor, media_root=clips, sampling=sampling, max_length=prompt_len + 2).collate([pair])
    assert int((cut["input_ids"] == processor.video_token_id).sum(-1)[0]) == n_video
    assert int((cut["labels"][0] != -100).sum()) == 2
    dropper = VideoLLMAdapter(processor, media_root=clips, sampling=sampling, max_length=prompt_len + 2, truncation="drop")
    kept, reasons = dropper.filter_pairs([pair])
    assert kept == [] and reasons == {"response_exceeds_max_length": 1}
    tiny = VideoLLMAdapter(processor, media_root=clips, sampling=sampling, max_length=n_video)
    with pytest.raises(ValueError, match="dropped"):
        tiny.collate([pair])
    assert tiny.dropped["prompt_exceeds_max_length"] == 1


def test_processor_without_video_is_refused() -> None:
    from transformers import AutoProcessor

    from mmalign.tiny import cached_tiny

    with pytest.raises(ValueError, match="video"):
        VideoLLMAdapter(AutoProcessor.from_pretrained(cached_tiny("llava")))


def test_per_side_sampling_keeps_the_adapters_frame_size(clips: Path) -> None:
    from transformers import AutoProcessor

    from mmalign.tiny import cached_tiny

    adapter = VideoLLMAdapter(AutoProcessor.from_pretrained(cached_tiny("qwen2_5_vl")), media_root=clips,
                              sampling=FrameSampling(num_frames=4, max_side=24))
    pair = _pairs()[2].with_root(clips)  # rejected side: meta sampling {"num_frames": 2}
    assert adapter.clip(pair, "chosen").frames.shape == (4, 3, 16, 24)
    assert adapter.clip(pair, "rejected").frames.shape == (2, 3, 16, 24)
    bad = PreferencePair("bad", "q", "a", "b", ["media/red.mp4"], [], meta={"sampling": {"rejected": {"frames": 2}}})
    with pytest.raises(ValueError, match="bad.*sampling"):
        adapter.clip(bad.with_root(clips), "rejected")
