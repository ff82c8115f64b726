"""Attention backend: xformers memory-efficient attention on CUDA when installed, torch SDPA otherwise.

xformers is an optional extra (``pip install mmalign[xformers]``) and runs only on CUDA; it is
imported lazily, never at import time of this module. Every choice that falls back says so once
through ``logging`` (and returns the backend used), so a run never silently differs from what was
asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["attention", "resolve_backend", "set_attention_backend", "xformers_available"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "xformers", "sdpa"]


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """True when CUDA is available and ``xformers.ops`` imports."""
    if not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # a wheel built for another torch raises at import
        log.warning("xformers is installed but does not import (%s); using torch SDPA", exc)
        return False
    return True


def resolve_backend(requested: Backend = "auto") -> str:
    """The backend that will run: ``"xformers"`` or ``"sdpa"``; logs a clear message on fallback."""
    if requested not in ("auto", "xformers", "sdpa"):
        raise ValueError(f"unknown attention backend {requested!r}; use auto, xformers or sdpa")
    if requested == "sdpa":
        return "sdpa"
    if xformers_available():
        return "xformers"
    if requested == "xformers":
        why = "no CUDA device" if not torch.cuda.is_available() else "xformers is not installed"
        log.warning("attention: xformers was requested but %s; falling back to torch SDPA", why)
    return "sdpa"


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_bias: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention, ``(B, H, M, K)`` layout in and out (torch's convention).

    ``attn_bias`` is an additive float bias broadcastable to ``(B, H, M, N)``. xformers runs only
    for CUDA tensors; CPU tensors always take SDPA.
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"attention expects (B, H, M, K) tensors, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if query.is_cuda and resolve_backend(backend) == "xformers":
        import xformers.ops as xops

        bias = None
        if attn_bias is not None:
            b, h, m, n = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
            bias = attn_bias.to(query.dtype).expand(b, h, m, n)
        # xformers wants (B, M, H, K)
        out = xops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias)


def set_attention_backend(model: torch.nn.Module, backend: Backend = "auto") -> str:
    """Switch a diffusers model (UNet, transformer, VAE) or a transformers model to ``backend``.

    Returns the backend actually in use. diffusers models get xformers through their own
    ``enable_xformers_memory_efficient_attention``; their default processors already call SDPA; transformers models use their ``sdpa`` attention implementation (they have no
    xformers path, which is said once when xformers was asked for).
    """
    used = resolve_backend(backend)
    if hasattr(model, "set_attn_processor"):  # diffusers ModelMixin with attention processors
        if used == "xformers":
            model.enable_xformers_memory_efficient_attention()
        elif any("XFormers" in type(p).__name__ for p in model.attn_processors.values()):
            model.disable_xformers_memory_efficient_attention()  # back to diffusers' SDPA processors
        return used
    if hasattr(model, "set_attn_implementation"):  # transformers PreTrainedModel
        if used == "xformers":
            log.warning("attention: %s has no xformers path in transformers; using torch SDPA",
                        type(model).__name__)
            used = "sdpa"
        model.set_attn_implementation("sdpa")
        return used
    if backend == "xformers":
        log.warning("attention: %s has no switchable attention; left as is (SDPA where it calls it)",
                    type(model).__name__)
    return "sdpa"
