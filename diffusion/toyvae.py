"""``AutoencoderKL`` VAEs whose weights are set, not trained, for the toy-world pipelines.

A learned VAE small enough to train on a CPU in minutes draws the world's shapes too poorly for the pixel
checker, so the toy text-to-image and one-step pipelines use VAEs whose encode and decode are exact maps:

* :func:`identity_vae`: ``encode(x).latent_dist.mean = (x - bg) / 0.5`` at full resolution (3 channels) and
  ``decode`` its inverse, exact to about 1e-6 (the one-step pipeline);
* :func:`pooled_vae`: the 2x2 mean of ``(x - bg) / 0.5`` at half resolution and ``decode`` bilinear upsampling
  by 2 plus ``bg`` (the text-to-image pipeline, whose UNet then works at 16x16).

``bg`` is the world's background in [-1, 1]. How: every ResNet block's last convolution is zero, so each block
passes its input through; ``conv_in`` writes ``x``, ``-x`` and a constant ``K = 1000`` into the features, so
the one-group norms subtract ``K / C`` and divide by ``K * sqrt(C - 1) / C`` whatever the image (``x`` and
``-x`` cancel in the mean; ``x``'s share of the variance is below 1e-5), and their affine maps restore
``x + 20``, where SiLU is the identity to 1e-7; ``conv_out`` removes the offset. The pooled VAE's stride-2
convolution averages each 2x2 block, and its decoder's convolution after nearest upsampling is the
``[1, 2, 1] / 4`` kernel in both directions, which makes the two together bilinear upsampling.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LATENT_SCALE", "background", "identity_vae", "pooled_vae"]

_CHANNELS = 8
_K = 1000.0  # constant feature that makes the one-group GroupNorm a fixed affine map
_B = 20.0  # offset that puts SiLU's input where SiLU(x) = x to 1e-7
#: latent = (pixel - background) / LATENT_SCALE, pixels in [-1, 1]
LATENT_SCALE = 0.5


def background() -> torch.Tensor:
    """The toy world's background colour in [-1, 1], one value per RGB channel."""
    from mmalign.toyworld import BACKGROUND

    return torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1


def _blank(blocks: int, sample_size: int) -> Any:
    """A zeroed ``AutoencoderKL`` with ``blocks`` blocks of ``_CHANNELS``, one-group norms of weight 1."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(_CHANNELS,) * blocks,
                        layers_per_block=1, latent_channels=3, norm_num_groups=1, sample_size=sample_size,
                        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=1.0)
    for p in vae.parameters():
        p.zero_()
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.fill_(1.0)
    return vae


def _features_in(conv: torch.nn.Conv2d, gain: float, offset: torch.Tensor) -> None:
    """Channels 0-2: ``gain * in + offset``; 3-5: their negation; 6: the constant ``K``."""
    for i in range(3):
        conv.weight[i, i, 1, 1] = gain
        conv.bias[i] = offset[i]
        conv.weight[3 + i, i, 1, 1] = -gain
        conv.bias[3 + i] = -offset[i]
    conv.bias[6] = _K


def _norm_out(norm: torch.nn.GroupNorm) -> None:
    """The final one-group norm maps channels 0-2 back to ``in + B`` (the others to 0)."""
    c = _CHANNELS
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:3] = _K * (c - 1) ** 0.5 / c
    norm.bias[:3] = _B + _K / c


def _finish(vae: Any, enc_offset: torch.Tensor, dec_offset: torch.Tensor) -> Any:
    """Both ``conv_out`` (mean channels ``(h - B + enc_offset) / scale``, log-variance -30, the clamp; decoder
    ``h - B + dec_offset``), both final norms, and pass-through ResNet blocks."""
    enc, dec = vae.encoder, vae.decoder
    _norm_out(enc.conv_norm_out)
    _norm_out(dec.conv_norm_out)
    for i in range(3):
        enc.conv_out.weight[i, i, 1, 1] = 1 / LATENT_SCALE
        enc.conv_out.bias[i] = (enc_offset[i] - _B) / LATENT_SCALE
        enc.conv_out.bias[3 + i] = -30.0
        dec.conv_out.weight[i, i, 1, 1] = 1.0
        dec.conv_out.bias[i] = dec_offset[i] - _B
    for module in vae.modules():
        if type(module).__name__ == "ResnetBlock2D":
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    return vae.eval()


@torch.no_grad()
def identity_vae(sample_size: int = 32) -> Any:
    """``encode(x).latent_dist.mean = (x - bg) / 0.5`` at full resolution; ``decode`` its inverse."""
    vae = _blank(1, sample_size)
    bg = background()
    _features_in(vae.encoder.conv_in, 1.0, torch.zeros(3))
    _features_in(vae.decoder.conv_in, LATENT_SCALE, bg)
    return _finish(vae, enc_offset=-bg, dec_offset=torch.zeros(3))


@torch.no_grad()
def pooled_vae(sample_size: int = 32) -> Any:
    """``encode(x).latent_dist.mean`` = the 2x2 mean of ``(x - bg) / 0.5``; ``decode`` = bilinear upsampling by 2
    plus ``bg`` (the background beyond the border)."""
    vae = _blank(2, sample_size)
    bg = background()
    _features_in(vae.encoder.conv_in, 1.0, -bg)
    down = vae.encoder.down_blocks[0].downsamplers[0].conv  # pads right and bottom, 3x3, stride 2: taps 0-1
    for i in range(7):
        down.weight[i, i, :2, :2] = 0.25
    _features_in(vae.decoder.conv_in, LATENT_SCALE, torch.zeros(3))
    up = vae.decoder.up_blocks[0].upsamplers[0].conv  # after nearest x2
    k1 = torch.tensor([0.25, 0.5, 0.25])
    for i in range(6):
        up.weight[i, i] = torch.outer(k1, k1)
    up.weight[6, 6, 1, 1] = 1.0  # the constant stays constant up to the border
    return _finish(vae, enc_offset=torch.zeros(3), dec_offset=bg)
