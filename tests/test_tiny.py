"""Tests for mmalign.tiny: every builder saves, loads back through the real from_pretrained path, runs,
is deterministic under its seed and stays tiny."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign import tiny
from mmalign.tiny import registry


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of every safetensors file under ``folder``, keyed by relative file path + name."""
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no safetensors under {folder}"
    for file in files:
        for name, tensor in load_file(file).items():
            tensors[f"{file.relative_to(folder)}::{name}"] = tensor
    return tensors


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _n_params(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# tokenizers


def test_llava_tokenizer_roundtrip_and_specials() -> None:
    tok = tiny.make_tiny_tokenizer(flavour="llava")
    text = "Describe the photo, a red cube! Ünïcode ok?"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # corpus words are single tokens, with and without the leading space
    assert tok.tokenize(" red") == ["Ġred"]
    assert tok.tokenize("red") == ["red"]
    image_ids = tok("<image>", add_special_tokens=False).input_ids
    assert image_ids == [tok.convert_tokens_to_ids("<image>")]
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert len(set(tok.all_special_ids)) == len(tok.all_special_ids)


def test_qwen_tokenizer_specials() -> None:
    tok = tiny.make_tiny_tokenizer(flavour="qwen")
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    assert tok("hello").input_ids[0] != tok.convert_tokens_to_ids("<|im_start|>")  # no bos
    with pytest.raises(ValueError, match="flavour"):
        tiny.make_tiny_tokenizer(flavour="t5")


# ------------------------------------------------------------------------------------------------
# vision-language


def test_llava_loads_runs_and_expands_image_tokens(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny.make_tiny_llava(tmp_path / "llava")
    assert path == tmp_path / "llava"
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"

    inputs = processor(text=[prompt], images=[_photo()], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, tiny.LLAVA_IMAGE_SIZE, tiny.LLAVA_IMAGE_SIZE)
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert n_image == tiny.LLAVA_NUM_IMAGE_TOKENS == 16  # (32 / 8) ** 2 patches, CLS dropped
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(out.logits).all()

    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert _n_params(_weights(path)) < 300_000


def test_llava_batch_with_left_padding(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny.make_tiny_llava(tmp_path / "llava")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    prompts = ["USER: <image>\nshort ASSISTANT:", "USER: <image>\na much longer question here ASSISTANT:"]
    inputs = processor(
        text=prompts, images=[_photo(seed=1), _photo(seed=2)], return_tensors="pt", padding=True
    )
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1, 0] == 1  # left padded
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_qwen2vl_loads_runs_images_and_video(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny.make_tiny_qwen2vl(tmp_path / "qwen")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # smart_resize: 48x64 -> 56x56 (min_pixels), 4x4 patches of 14, 2x2 merge -> 4 tokens;
    # 512x512 -> 112x112 (max_pixels), 8x8 patches -> 16 tokens.
    for (h, w), grid, n_tokens in [((48, 64), [1, 4, 4], 4), ((512, 512), [1, 8, 8], 16)]:
        inputs = processor(text=[prompt], images=[_photo(h, w)], return_tensors="pt")
        assert inputs["image_grid_thw"].tolist() == [grid]
        assert inputs["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * 14 * 14)
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == n_tokens
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3

    # video: 8 frames of 56x56 -> temporal patches of 2 frames: grid (4, 4, 4) -> 4 * 4 * 4 / 4 = 16 tokens
    video_messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    video_prompt = processor.apply_chat_template(video_messages, add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 256, size=(8, 56, 56, 3), dtype=np.uint8)
    inputs = processor(text=[video_prompt], videos=[frames], return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_causal_lm_loads_and_runs(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.make_tiny_causal_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a red cube", "the cat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------------------------
# diffusion


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_loads_and_samples_fast(tmp_path: Path, prediction_type: str) -> None:
    from diffusers import StableDiffusionPipeline

    path = tiny.make_tiny_sd(tmp_path / "sd", prediction_type=prediction_type)
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    pipe("a cat", num_inference_steps=1, output_type="pt")  # warm-up: first-call allocations
    start = time.process_time()  # CPU time: robust to other processes sharing the cores
    images = pipe(
        "a red cube",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    elapsed = time.process_time() - start
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert elapsed < 2.0, f"2-step tiny SD sample took {elapsed:.2f} s of CPU"
    # the VAE downscales by 2: 32x32 pixels <-> 4x16x16 latents
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)


def test_sd_one_step_turbo_scheduler(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path = tiny.make_tiny_sd(tmp_path / "sd", scheduler="euler_ancestral")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="scheduler"):
        tiny.make_tiny_sd(tmp_path / "bad", scheduler="heun")
    with pytest.raises(ValueError, match="prediction_type"):
        tiny.make_tiny_sd(tmp_path / "bad", prediction_type="flow")


def test_sdxl_loads_and_samples(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = tiny.make_tiny_sdxl(tmp_path / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    # 6 time ids x addition_time_embed_dim 8 + pooled projection 32
    assert pipe.unet.config.projection_class_embeddings_input_dim == 6 * 8 + 32
    images = pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_sd3_loads_and_samples(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    path = tiny.make_tiny_sd3(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = pipe(
        "a red cube", num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=8
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert pipe.tokenizer_3.tokenize("a red cube") == ["\u2581a", "\u2581red", "\u2581cube"]
    # like real SD3, T5 can be dropped at load time
    without_t5 = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    without_t5.set_progress_bar_config(disable=True)
    images = without_t5("a cube", num_inference_steps=1, output_type="pt", max_sequence_length=8).images
    assert images.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------
# determinism and size, for every registered builder

#: parameter budgets: the VLM and text models are a few hundred thousand parameters, the pipelines a few
#: million (open_clip: 1.58M of it is the 49408 x 32 token embedding); a new builder gets DEFAULT_MAX_PARAMS
MAX_PARAMS = {"causal_lm": 200_000, "open_clip": 2_000_000, "sd": 3_000_000, "sdxl": 3_000_000,
              "sd3": 3_000_000, "flux": 3_000_000}
DEFAULT_MAX_PARAMS = 300_000
_NEEDS_NUM2WORDS = pytest.mark.skipif(
    importlib.util.find_spec("num2words") is None, reason="SmolVLMProcessor needs the num2words package"
)


def _registry_cases() -> list:
    return [pytest.param(name, marks=_NEEDS_NUM2WORDS) if name == "smolvlm" else name for name in tiny.TINY_BUILDERS]


@pytest.mark.parametrize("name", _registry_cases())
def test_builder_is_deterministic_and_tiny(tmp_path: Path, name: str) -> None:
    """Every builder of TINY_BUILDERS: the same seed gives bitwise-identical weights, another seed other
    weights (same names), the caller's RNG is left alone, and the model stays within its budget."""
    builder = tiny.TINY_BUILDERS[name]
    before = torch.random.get_rng_state()
    first = _weights(builder(tmp_path / "a", seed=0))
    assert torch.equal(torch.random.get_rng_state(), before), "builder disturbed the global RNG"
    again = _weights(builder(tmp_path / "b", seed=0))
    other = _weights(builder(tmp_path / "c", seed=1))
    assert _same(first, again)
    assert first.keys() == other.keys() and not _same(first, other)
    assert _n_params(first) < MAX_PARAMS.get(name, DEFAULT_MAX_PARAMS)


# ------------------------------------------------------------------------------------------------
# cache


def test_cached_tiny_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMALIGN_TINY_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def fake_builder(out_dir: Path, *, seed: int = 0) -> Path:
        calls.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text(json.dumps({"seed": seed}))
        return Path(out_dir)

    monkeypatch.setitem(tiny.TINY_BUILDERS, "fake", fake_builder)
    monkeypatch.setattr(registry, "_MEMO", {})
    first = tiny.cached_tiny("fake", seed=3)
    assert first.parent == tmp_path / "cache"
    assert json.loads((first / "config.json").read_text()) == {"seed": 3}
    assert tiny.cached_tiny("fake", seed=3) == first
    registry._MEMO.clear()  # a second process finds the folder on disk
    assert tiny.cached_tiny("fake", seed=3) == first
    assert len(calls) == 1
    assert tiny.cached_tiny("fake", seed=4) != first
    assert len(calls) == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(KeyError, match="unknown tiny model"):
        tiny.cached_tiny("nope")


def test_cached_tiny_loses_race_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker renames its build into place while we build: we keep theirs, drop ours."""
    monkeypatch.setenv("MMALIGN_TINY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_MEMO", {})

    def racing_builder(out_dir: Path) -> Path:
        final.mkdir(parents=True)
        (final / "winner.txt").write_text("other worker")
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "winner.txt").write_text("this worker")
        return Path(out_dir)

    monkeypatch.setitem(tiny.TINY_BUILDERS, "racer", racing_builder)
    final = tmp_path / "cache" / registry._cache_key("racer", {})
    assert tiny.cached_tiny("racer") == final
    assert (final / "winner.txt").read_text() == "other worker"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [final.name]


def test_cache_key_digests_only_the_builders_own_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached model is rebuilt when its builder's sources change, and only then: the key digests the
    builder's module and the mmalign modules it imports, not the other families."""
    sources = {name: {p.name for p in registry._builder_sources(b)} for name, b in tiny.TINY_BUILDERS.items()}
    assert {"pipelines.py", "tokenization.py", "common.py", "utils.py"} <= sources["sd"]
    assert not sources["sd"] & {"vlm.py", "video_llm.py", "openclip.py", "text.py", "registry.py"}
    assert {"video_llm.py", "vlm.py", "text.py", "tokenization.py"} <= sources["llava_next_video"]
    assert not sources["llava"] & {"pipelines.py", "video_llm.py", "openclip.py"}

    # a builder in its own module: editing that module changes its key and no other
    module_file = tmp_path / "tiny_family_probe.py"
    module_file.write_text("from mmalign.utils import seeded\n\ndef build(out_dir, *, seed=0):\n    return out_dir\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_family_probe

    monkeypatch.setitem(tiny.TINY_BUILDERS, "probe", tiny_family_probe.build)
    assert {p.name for p in registry._builder_sources(tiny_family_probe.build)} == {"tiny_family_probe.py", "utils.py"}
    before = {name: registry._cache_key(name, {}) for name in ("probe", "sd", "llava")}
    module_file.write_text(module_file.read_text() + "# edited\n")
    registry._source_files.cache_clear()
    after = {name: registry._cache_key(name, {}) for name in ("probe", "sd", "llava")}
    assert after["probe"] != before["probe"]
    assert (after["sd"], after["llava"]) == (before["sd"], before["llava"])
    assert registry._cache_key("sd", {"seed": 1}) != after["sd"]


def test_cached_tiny_real_sd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("MMALIGN_TINY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_MEMO", {})
    path = tiny.cached_tiny("sd", prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------------
# open_clip


def test_open_clip_roundtrip(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    import open_clip

    path = tiny.make_tiny_open_clip(tmp_path / "clip")
    assert sorted(p.name for p in path.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    model, preprocess_cfg, tokenizer = tiny.load_tiny_open_clip(path)
    assert preprocess_cfg["size"] == 32
    saved = load_file(path / "open_clip_model.safetensors")
    assert _same(saved, dict(model.state_dict()))  # the loader really read our weights
    ids = tokenizer(["a red cube", "a cat"])
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    with torch.no_grad():
        image_features = model.encode_image(torch.rand(2, 3, 32, 32))
        text_features = model.encode_text(ids)
    assert image_features.shape == (2, 32) and text_features.shape == (2, 32)
    # open_clip's own one-call API reads the same folder, with our preprocessing
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    assert preprocess(_photo(48, 64)).shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        tiny.load_tiny_open_clip(tmp_path)


def test_import_is_light_and_bad_out_dir_is_clear(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, mmalign.tiny\n"
        "heavy = [m for m in ('open_clip', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        tiny.make_tiny_causal_lm(not_a_dir)


def test_seeded_repeats_draws_and_keeps_the_callers_state() -> None:
    """``mmalign.utils.seeded`` (shared by the builders and production code; re-exported by mmalign.tiny)
    gives the same draws for the same seed, different ones for another seed, and leaves the global CPU
    generator where it was."""
    from mmalign.utils import seeded

    assert tiny.seeded is seeded
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with seeded(7):
        first = torch.rand(4)
    with seeded(7, torch.device("cpu")):
        again = torch.rand(4)
    with seeded(8):
        other = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)
