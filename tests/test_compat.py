"""The private third-party behaviour ``mmalign._compat`` relies on, checked against the installed libraries:
an upgrade that changes one fails here, by name."""

from __future__ import annotations

import pytest
import torch

from mmalign import _compat


def test_peft_lora_layers_have_the_private_disable_flag():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"],
                                                                                   init_lora_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert hasattr(layer, "_disable_adapters"), "peft dropped LoRA layers' _disable_adapters"
    x = torch.randn(3, 4)
    with torch.no_grad():
        adapted = model(x)
        _compat.set_lora_layer_disabled(layer, True)
        base = model(x)
        with model.disable_adapter():
            public = model(x)
        _compat.set_lora_layer_disabled(layer, False)
    assert torch.equal(base, public) and not torch.allclose(base, adapted)


def test_accelerate_keeps_one_resettable_shared_state():
    from accelerate.state import AcceleratorState

    assert isinstance(AcceleratorState._shared_state, dict), "accelerate's AcceleratorState._shared_state moved"
    assert callable(AcceleratorState._reset_state), "accelerate's AcceleratorState._reset_state moved"


def test_torch_dropout_base_class():
    assert _compat.is_active_dropout(torch.nn.Dropout(0.1)) and _compat.is_active_dropout(torch.nn.Dropout2d(0.5))
    assert not _compat.is_active_dropout(torch.nn.Dropout(0.0)) and not _compat.is_active_dropout(torch.nn.ReLU())


def test_diffusers_models_declare_their_checkpointing_support():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    assert _compat.supports_gradient_checkpointing(UNet2DConditionModel)
    assert _compat.supports_gradient_checkpointing(AutoencoderKL)
    assert not _compat.supports_gradient_checkpointing(torch.nn.Linear(1, 1))


def test_transformers_image_token_mismatch_message():
    from transformers import AutoModelForImageTextToText

    from mmalign.tiny import cached_tiny

    model = AutoModelForImageTextToText.from_pretrained(cached_tiny("llava"))
    image_token = model.config.image_token_id
    ids = torch.tensor([[1, image_token, 5, 6]])  # one image token where the image gives many features
    pixels = torch.zeros(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with pytest.raises((ValueError, RuntimeError)) as info:
        model(input_ids=ids, pixel_values=pixels)
    assert _compat.is_image_token_mismatch(info.value), f"transformers' wording changed: {info.value}"
