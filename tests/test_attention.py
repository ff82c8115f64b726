"""Attention backend: SDPA fallback on the CPU, xformers only where CUDA and xformers exist."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mmalign.attention import attention, resolve_backend, set_attention_backend, xformers_available
from mmalign.tiny import cached_tiny


def _qkv(device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 16, 8, generator=g).to(device, dtype) for _ in range(3)]


def test_cpu_falls_back_to_sdpa_and_says_so(caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.WARNING, logger="mmalign.attention"):
        assert resolve_backend("xformers") == "sdpa"
    assert "falling back to torch SDPA" in caplog.text
    assert resolve_backend("auto") == "sdpa"
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="xformers"), F.scaled_dot_product_attention(q, k, v))


def test_bias_and_shape_checks():
    q, k, v = _qkv()
    bias = torch.zeros(1, 1, 16, 16)
    bias[..., 8:] = float("-inf")  # attend only to the first 8 keys
    out = attention(q, k, v, attn_bias=bias)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k[:, :, :8], v[:, :, :8]))
    with pytest.raises(ValueError, match=r"\(B, H, M, K\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")


def test_set_backend_on_diffusers_and_transformers_models():
    from diffusers import UNet2DConditionModel
    from transformers import AutoModelForCausalLM

    unet = UNet2DConditionModel.from_pretrained(cached_tiny("sd") / "unet")
    expected = "xformers" if xformers_available() else "sdpa"
    assert set_attention_backend(unet, "xformers") == expected
    assert set_attention_backend(unet, "sdpa") == "sdpa"
    assert not any("XFormers" in type(p).__name__ for p in unet.attn_processors.values())
    lm = AutoModelForCausalLM.from_pretrained(cached_tiny("causal_lm"))
    assert set_attention_backend(lm, "xformers") == "sdpa"
    assert lm.config._attn_implementation == "sdpa"


@pytest.mark.xformers
def test_xformers_matches_sdpa_on_cuda():
    q, k, v = _qkv("cuda", torch.float16)
    torch.testing.assert_close(attention(q, k, v, backend="xformers"), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-3, rtol=2e-3)
    unet = __import__("diffusers").UNet2DConditionModel.from_pretrained(cached_tiny("sd") / "unet").cuda()
    assert set_attention_backend(unet, "xformers") == "xformers"
    assert any("XFormers" in type(p).__name__ for p in unet.attn_processors.values())
