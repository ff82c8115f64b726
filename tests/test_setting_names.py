"""One name and one default per setting across the adapters and the commands' configs."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from diffusion.adapter import DiffusionAdapter
from diffusion.train import DiffusionTrainConfig
from mmalign.text import CausalLMAdapter
from video.adapter import VideoLLMAdapter
from vision.adapter import VLMAdapter


def _defaults(cls) -> dict:  # noqa: ANN001
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def test_sequence_adapters_agree_on_names_and_defaults() -> None:
    adapters = [VLMAdapter, VideoLLMAdapter, CausalLMAdapter]
    for cls in adapters:
        d = _defaults(cls)
        assert d["max_length"] is None, cls  # no cut unless asked; the commands set their own
        assert d["append_eos"] is True, cls
    for cls in (VLMAdapter, VideoLLMAdapter, DiffusionAdapter):
        assert "media_root" in _defaults(cls), cls


def test_diffusion_adapter_and_command_agree_on_t5_length() -> None:
    config_default = {f.name: f.default for f in dataclasses.fields(DiffusionTrainConfig)}["max_sequence_length"]
    assert _defaults(DiffusionAdapter)["max_sequence_length"] == config_default == 256


def test_old_names_still_accepted(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from diffusion.train import load_pipeline
    from mmalign.tiny import cached_tiny

    tok = AutoTokenizer.from_pretrained(cached_tiny("causal_lm"))
    assert CausalLMAdapter(tok, add_eos=False).append_eos is False
    pipe = load_pipeline("tiny:sd")
    assert DiffusionAdapter(pipe, dataset_dir=tmp_path).media_root == tmp_path
    with pytest.raises(ValueError, match="media_root only"):
        DiffusionAdapter(pipe, dataset_dir=tmp_path, media_root=tmp_path)
