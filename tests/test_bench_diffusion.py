"""``benchmarks.diffusion``: its live-tensor peak (the CPU analogue of
``torch.cuda.max_memory_allocated``) counts what a training step holds."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import diffusion as bench_diffusion


def _peak_of_steps(optimizer_name: str) -> tuple[int, int]:
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512, bias=False)  # W = 512 * 512 * 4 bytes = 1 MiB
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-3))
    x = torch.randn(8, 512)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return bench_diffusion._tensor_peak_increase(prof), model.weight.numel() * 4


def test_tensor_peak_counts_gradients_and_optimizer_state():
    """AdamW holds grads + two moments = 3 W at its step; SGD without momentum only the grads, 1 W.
    Activations here are 8 x 512 x 4 bytes = 16 KiB, so both bounds are tight to W / 8."""
    adamw, w = _peak_of_steps("adamw")
    sgd, _ = _peak_of_steps("sgd")
    assert 3 * w <= adamw <= 3 * w + w // 8
    assert w <= sgd <= w + w // 8
