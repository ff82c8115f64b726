"""LoRA targets of VLMAdapter: the language model's linear layers by default, in every supported family."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from vision.adapter import LORA_SCOPES, VLMAdapter

_NEEDS_NUM2WORDS = pytest.mark.skipif(
    importlib.util.find_spec("num2words") is None, reason="SmolVLMProcessor needs the num2words package"
)
FAMILIES = ["llava", "llava_next", "qwen2vl", "qwen2_5_vl", "idefics3", pytest.param("smolvlm", marks=_NEEDS_NUM2WORDS)]
LANGUAGE = re.compile(r".*\.(language_model|text_model)\..*\.(q|k|v|o|gate|up|down)_proj")
PROJECTOR = re.compile(r".*\.(multi_modal_projector|visual\.merger|connector)\..*")
VISION = re.compile(r".*\.(vision_tower|visual\.blocks|vision_model)\..*")


def _adapted(family: str, scope: str) -> tuple[set[str], set[str]]:
    """(names of the modules peft wrapped, names of every nn.Linear of the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.tiny import cached_tiny

    path = cached_tiny(family)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    adapter = VLMAdapter(AutoProcessor.from_pretrained(path), lora_scope=scope)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=adapter.lora_target_modules))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    return wrapped, linears


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_are_the_language_model(family: str) -> None:
    """Before: no lora_target_modules on VLMAdapter, so the engine fell back to all-linear (vision tower and
    projector adapted too)."""
    wrapped, linears = _adapted(family, "language")
    expected = {n for n in linears if LANGUAGE.fullmatch(n)}
    assert expected and wrapped == expected
    assert not any(VISION.fullmatch(n) or PROJECTOR.fullmatch(n) for n in wrapped)


@pytest.mark.parametrize("family", ["llava", "qwen2vl", "idefics3"])
def test_projector_and_all_are_opt_in(family: str) -> None:
    wrapped, linears = _adapted(family, "language+projector")
    projector = {n for n in linears if PROJECTOR.fullmatch(n)}
    assert projector and projector <= wrapped
    assert not any(VISION.fullmatch(n) for n in wrapped)
    wrapped_all, _ = _adapted(family, "all")
    assert any(VISION.fullmatch(n) for n in wrapped_all) and "lm_head" not in wrapped_all


def test_engine_reads_the_adapter_targets(tmp_path) -> None:  # noqa: ANN001
    """The engine takes TrainConfig.lora_target_modules, else adapter.lora_target_modules: after a LoRA run
    only language-model weights were trainable."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.engine import TrainConfig, train
    from mmalign.pairs import PairDataset, PreferencePair, write_pairs
    from mmalign.tiny import cached_tiny

    path = cached_tiny("llava")
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    (tmp_path / "data" / "media").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(
        tmp_path / "data" / "media" / "a.png")
    write_pairs(tmp_path / "data", [PreferencePair(f"p{i}", "describe the image", "a red cube", "a blue dog",
                                                   ["media/a.png"], ["media/a.png"]) for i in range(2)])
    pairs = PairDataset(tmp_path / "data")
    config = TrainConfig(output_dir=str(tmp_path / "run"), lora_r=2, max_steps=1, batch_size=2, trackers=[], progress=False,
                         plot=False)
    result = train(model, VLMAdapter(AutoProcessor.from_pretrained(path)), pairs, config)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(LANGUAGE.fullmatch(n.split(".lora_")[0]) for n in trainable)
    assert set(LORA_SCOPES) == {"language", "language+projector", "all"}
