"""Every use of a third-party *private* API, in one module.

Each shim says what it relies on and what it falls back to; ``tests/test_compat.py`` checks each
assumption against the installed libraries, so an upgrade that removes one fails there, loudly,
instead of somewhere in a training run. Public APIs are used directly elsewhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "is_active_dropout",
    "is_image_token_mismatch",
    "reset_accelerate_precision",
    "set_lora_layer_disabled",
    "supports_gradient_checkpointing",
]


def set_lora_layer_disabled(layer: Any, disabled: bool) -> None:
    """Switch one peft LoRA layer off or on.

    peft's public ``enable_adapters()`` also re-derives ``requires_grad`` of every adapter weight
    (milliseconds per step on small models); under ``no_grad`` only the layer's private
    ``_disable_adapters`` flag matters, so it is set directly where the layer has it.
    """
    if hasattr(layer, "_disable_adapters"):
        layer._disable_adapters = disabled
    else:  # a peft without the private flag: the public (slower) call
        layer.enable_adapters(not disabled)


def reset_accelerate_precision(mixed_precision: str) -> None:
    """Let a second ``train()`` in one single process use another mixed precision.

    accelerate keeps one global ``AcceleratorState`` (its private ``_shared_state``) and refuses a
    different ``mixed_precision`` later; in a single process the state holds nothing else worth
    keeping, so it is cleared with the private ``_reset_state``. A distributed launch is untouched.
    """
    from accelerate.state import AcceleratorState

    shared = getattr(AcceleratorState, "_shared_state", None)
    if shared and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        current = str(shared.get("_mixed_precision", mixed_precision))
        if current != mixed_precision:
            AcceleratorState._reset_state()


def is_active_dropout(module: torch.nn.Module) -> bool:
    """A dropout layer of any dimensionality (torch's private base ``_DropoutNd``) with p > 0."""
    return isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0


def supports_gradient_checkpointing(model: Any) -> bool:
    """Whether a diffusers model has its own per-block checkpointing switch (private class flag)."""
    return bool(getattr(model, "_supports_gradient_checkpointing", False))


def is_image_token_mismatch(exc: BaseException) -> bool:
    """transformers' error when image tokens in the text and image features disagree (it has no type of
    its own: the message is all there is; its wording has been "Image features and image tokens do not
    match")."""
    text = str(exc).lower()
    return "image" in text and "match" in text
