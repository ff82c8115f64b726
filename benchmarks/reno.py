"""ReNO benchmark section (wired into ``python scripts/bench.py reno``; also runs on its own).

Figures:

* ``toy``: tiny SD pipeline, one-step sampling, reward = mean redness ``R - (G + B) / 2``,
  ``prompts`` x ``steps`` (default 8 x 50) at ``size`` px: initial and best reward per prompt.
* ``time``: seconds per ReNO iteration of ``optimize_noise`` against the physical lower bound,
  measured separately on the same latent: one UNet forward + x0 update + VAE decode + reward
  forward, then one backward, written directly on the diffusers modules (no optimizer, no
  clipping, no bookkeeping). Rounds alternate the two (so machine load hits both alike); each
  round's first iteration is dropped as warm-up; medians over all iterations, for two clocks:
  wall time and process CPU time (the latter is what to read on a CPU shared with other jobs).
  Reward: tiny open_clip ``ClipScore`` + redness (text features are cached by the reward in both).
* ``memory``: peak resident memory of one process running ``optimize_noise`` with both
  checkpointing options off vs on. Method: a fresh subprocess per setting loads the model, runs
  one warm-up iteration, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``),
  runs the loop, and reports ``VmHWM - VmRSS_before`` from ``/proc/self/status``. The child runs
  with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc unmaps every freed block over 64 KiB and RSS
  tracks live tensor memory rather than the allocator's cache. (On CUDA it reports
  ``torch.cuda.max_memory_allocated`` deltas instead.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusion.reno import NoiseSampler, optimize_noise
from mmalign.rewards import CallableReward, ClipScore, WeightedRewards, mean_redness
from mmalign.tiny import cached_tiny

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["a red apple", "a blue car", "a green field", "a cat on a mat", "a sunset over the sea",
           "a city at night", "a bowl of soup", "an old castle"]
DEFAULTS = {"prompts": 8, "steps": 50, "size": 32, "repeats": 8, "iters": 6, "time_batch": 1, "mem_size": 64,
            "mem_batch": 4, "device": "cuda" if torch.cuda.is_available() else "cpu", "skip_toy": False,
            "threads": 1}


def _pipe(device: str) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cached_tiny("sd", scheduler="euler")).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rewards(device: str) -> WeightedRewards:
    return WeightedRewards([(ClipScore(pretrained=cached_tiny("open_clip"), device=device), 0.01),
                            (CallableReward(mean_redness, "redness"), 1.0)])


def bench_toy(o: dict[str, Any]) -> dict[str, Any]:
    pipe = _pipe(o["device"])
    prompts = (PROMPTS * 8)[: o["prompts"]]
    t0 = time.perf_counter()
    res = optimize_noise(pipe, prompts, CallableReward(mean_redness, "redness"), steps=o["steps"],
                         height=o["size"], width=o["size"], progress=False)
    return {
        "prompts": prompts, "steps": o["steps"], "size": o["size"],
        "initial": [round(v, 5) for v in res.initial_rewards.tolist()],
        "best": [round(v, 5) for v in res.best_rewards.tolist()],
        "final": [round(v, 5) for v in res.rewards[-1].tolist()],
        "raised_on_all": bool((res.best_rewards > res.initial_rewards).all()),
        "best_iteration": res.best_iteration.tolist(), "nan_skipped": int(res.nan_skipped.sum()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _lower_bound(pipe: Any, rewards: WeightedRewards, prompts: list[str], z0: torch.Tensor, n: int,
                 timer: Callable[[], float]) -> list[float]:
    """One generator forward+backward + one reward forward+backward, straight on the diffusers modules."""
    unet, vae = pipe.unet.requires_grad_(False).eval(), pipe.vae.requires_grad_(False).eval()
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompts, z0.device, 1, False)[0]
    abar = float(pipe.scheduler.alphas_cumprod[999])
    a, s = abar**0.5, (1 - abar) ** 0.5
    t = torch.full((z0.shape[0],), 999, device=z0.device)
    sf = vae.config.scaling_factor
    sync = torch.cuda.synchronize if z0.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(n):
        z = z0.clone().requires_grad_(True)
        sync()
        t0 = timer()
        x = s * z
        eps = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        image = vae.decode((x - s * eps) / a / sf, return_dict=False)[0]
        rewards.loss((image / 2 + 0.5).clamp(0, 1), prompts).sum().backward()
        sync()
        times.append(timer() - t0)
    return times


def bench_time(o: dict[str, Any]) -> dict[str, Any]:
    """Alternating rounds of our loop and the lower bound; each round's first iteration is warm-up.

    Two clocks: wall (``perf_counter``) and this process's CPU time (``process_time``). On a CPU
    shared with other jobs the wall clock swings with their load; CPU time does not (it still sees
    cache contention). On CUDA only the wall clock means anything.
    """
    pipe, rewards = _pipe(o["device"]), _rewards(o["device"])
    prompts = (PROMPTS * 8)[: o["time_batch"]]
    sampler = NoiseSampler(pipe, prompts, height=o["size"], width=o["size"])
    z0 = torch.randn(len(prompts), *sampler.latent_shape, device=o["device"])
    clocks = {"wall": time.perf_counter} if o["device"] == "cuda" else {"wall": time.perf_counter,
                                                                      "cpu": time.process_time}
    out: dict[str, Any] = {"batch": len(prompts), "size": o["size"], "rounds": o["repeats"],
                           "iters_per_round": o["iters"], "goal": 1.15}
    for clock, timer in clocks.items():
        loop: list[float] = []
        bound: list[float] = []
        for r in range(o["repeats"]):
            # steps images scored, steps - 1 updates timed; the first timed update is the warm-up
            res = optimize_noise(pipe, prompts, rewards, steps=o["iters"] + 2, height=o["size"], width=o["size"],
                                 seed=r, progress=False, timer=timer)
            loop += res.iteration_times[1:].tolist()
            bound += _lower_bound(pipe, rewards, prompts, z0, o["iters"] + 1, timer)[1:]
        med_loop, med_bound = statistics.median(loop), statistics.median(bound)
        out[clock] = {"loop_s_per_iter_median": round(med_loop, 5), "lower_bound_s_median": round(med_bound, 5),
                      "ratio": round(med_loop / med_bound, 3), "n_loop": len(loop), "n_bound": len(bound)}
    return out


def _memory_child(o: dict[str, Any], checkpointing: bool) -> dict[str, Any]:
    pipe, rewards = _pipe(o["device"]), _rewards(o["device"])
    prompts = (PROMPTS * 8)[: o["mem_batch"]]
    kw = dict(height=o["mem_size"], width=o["mem_size"], progress=False, gradient_checkpointing=checkpointing,
              vae_checkpointing=checkpointing)
    optimize_noise(pipe, prompts, rewards, steps=2, **kw)  # warm-up (one update): allocator pools, lazy inits
    if o["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimize_noise(pipe, prompts, rewards, steps=2, **kw)
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "method": "cuda max_memory_allocated"}

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    optimize_noise(pipe, prompts, rewards, steps=2, **kw)
    return {"peak_bytes": status("VmHWM") - before, "method": "VmHWM - VmRSS after clear_refs (CPU RSS)"}


def bench_memory(o: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": o["mem_batch"], "size": o["mem_size"]}
    for flag in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.reno", "--memory-child", "on" if flag else "off", "--device", o["device"],
               "--mem-size", str(o["mem_size"]), "--mem-batch", str(o["mem_batch"]), "--threads", str(o["threads"])]
        # a fixed mmap threshold makes glibc return every freed block over 64 KiB to the kernel at once, so
        # RSS follows the live tensor bytes instead of what the allocator kept from the warm-up iteration
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        out["on" if flag else "off"] = {"peak_mib": round(child["peak_bytes"] / 2**20, 2)}
        out["method"] = child["method"]
    out["ratio_on_to_off"] = round(out["on"]["peak_mib"] / max(out["off"]["peak_mib"], 1e-9), 3)
    return out


def bench_reno(args: Any = None) -> dict[str, Any]:
    """Run the ReNO figures; ``args`` is any object with (some of) the attributes in ``DEFAULTS``."""
    o = {k: getattr(args, k, v) if args is not None else v for k, v in DEFAULTS.items()}
    if o["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_reno: --device cuda but no CUDA device")
    if o["threads"] > 0:  # on a shared CPU, one intra-op thread is far faster and steadier than spinning two
        torch.set_num_threads(o["threads"])
    figures: dict[str, Any] = {"device": o["device"], "torch_threads": torch.get_num_threads()}
    if not o["skip_toy"]:
        figures["toy"] = bench_toy(o)
    figures["time"] = bench_time(o)
    figures["memory"] = bench_memory(o)
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ReNO benchmark")
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--memory-child", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.memory_child:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        print(json.dumps(_memory_child(vars(args), args.memory_child == "on")))
        return
    figures = bench_reno(args)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
