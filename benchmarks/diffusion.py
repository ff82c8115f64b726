"""Diffusion benchmark (the diffusion speed and memory goals), on the CPU, one torch thread.

1. Our LoRA Diffusion-DPO step (``mmalign.engine.train`` + ``DiffusionAdapter``, reference = the same
   UNet with LoRA disabled) against the diffusers research example ``train_diffusion_dpo.py`` (LoRA,
   reference = adapters disabled), on the same tiny SD1.5-shaped pipeline (``cached_tiny("sd")``),
   same pairs, batch, resolution (32 px) and LoRA rank/alpha, in the same process, the contenders
   alternating (rotated order) within each repeat. Ours with the latent/text cache (built before
   timing) and without it. Goal: peer / ours-cached >= 1.3, peer / ours-uncached >= 1.0.
   The peer script is never part of this repository: give the folder holding it and its runner
   (``run_peer.py``, which stubs the unused ``wandb`` import and timestamps the script's per-step
   ``progress_bar.update``) with ``--peer DIR`` or ``MMALIGN_PEER_DIR``; without it this part is skipped.
2. MaPO against our Diffusion-DPO with a frozen reference, full fine-tuning, same batch, on a UNet
   wider than the tiny one (block_out_channels (64, 128)), caches on for both. Each run is a fresh
   subprocess: peak memory = the kernel's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
   after the model, data and cache are loaded) minus the RSS at that point, i.e. what training adds
   (optimizer state, gradients, activations and, for DPO, the engine's frozen copy of the UNet).
   Goals: time ratio <= 0.8, memory ratio <= 0.75. Four settings (``SETTINGS``): plain fp32 AdamW with
   4 pairs per micro-batch; Adafactor with 1 pair per micro-batch (4 accumulated); the same with gradient
   checkpointing (the Diffusion-DPO SDXL recipe); the same without checkpointing on a UNet twice as wide
   (weights a larger share of memory, as in larger models). What the reference costs is one
   weight copy, so the ratio depends on what else training holds: with AdamW (grads + two moments = 3
   copies) it cannot fall below 3/4 even with no activations at all; with Adafactor (grads + factored
   moments) and checkpointed activations the copy is a larger share.

Seconds per optimizer step are medians over the timed steps of a run (after ``warmup`` steps),
then medians over repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH, RESOLUTION, RANK, WARMUP = 4, 32, 4, 3
WIDE_BLOCKS = (64, 128)
# name -> (TrainConfig overrides, description)
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "adamw": ({"optimizer": "adamw"}, "AdamW, no gradient checkpointing"),
    "adafactor": ({"optimizer": "adafactor", "batch_size": 1, "grad_accum": BATCH},
                  f"Adafactor, 1 pair per micro-batch x {BATCH} accumulated, no gradient checkpointing"),
    "adafactor_ckpt": ({"optimizer": "adafactor", "gradient_checkpointing": True, "batch_size": 1,
                        "grad_accum": BATCH},
                       f"Adafactor + gradient checkpointing + 1 pair per micro-batch x {BATCH} accumulated (the "
                       "Diffusion-DPO SDXL recipe: Adafactor, checkpointing, batch 1 with accumulation)"),
    "adafactor_wider": ({"optimizer": "adafactor", "batch_size": 1, "grad_accum": BATCH, "unet_blocks": (128, 256)},
                        f"Adafactor, 1 pair per micro-batch x {BATCH} accumulated, no checkpointing, a UNet twice as "
                        "wide (block_out_channels (128, 256): 4x the weights, ~2x the activations)"),
}


# ----------------------------------------------------------------------------------------- data


def _jpeg(rng: np.random.Generator, brightness: float) -> bytes:
    """A smooth random 48x64 RGB image (bigger than the training size, so resize+crop runs)."""
    from PIL import Image

    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((64, 48), Image.BICUBIC)
    arr = np.clip(np.asarray(img, dtype=np.float32) * brightness + rng.normal(0, 8, (48, 64, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_datasets(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` Pick-a-Pic-style rows (caption, jpg_0, jpg_1, label_0) as a parquet folder for the
    peer (``datasets.load_dataset(folder)``, split "train") and convert the same rows into our pair
    folder with ``mmalign.pairs.from_pickapic``. Returns (peer_dir, ours_dir)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmalign.pairs import from_pickapic

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        bright, dark = _jpeg(rng, 1.2), _jpeg(rng, 0.8)
        first_wins = bool(i % 2)
        rows.append({
            "caption": f"a photo of thing {i % 7}",
            "jpg_0": bright if first_wins else dark,
            "jpg_1": dark if first_wins else bright,
            "label_0": 1.0 if first_wins else 0.0,
        })
    peer_dir = root / "peer_data"
    peer_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), peer_dir / "train-00000-of-00001.parquet")
    ours_dir = root / "pairs"
    from_pickapic(rows, ours_dir, durable=False)
    return peer_dir, ours_dir


# ----------------------------------------------------------------------------------------- ours


def _fresh_unet(pipeline_dir: Path, blocks: tuple[int, int] | None = None, seed: int = 0) -> torch.nn.Module:
    """The tiny pipeline's own UNet, or (``blocks``) a randomly initialised one with those block widths."""
    from diffusers import UNet2DConditionModel

    if blocks is None:
        return UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    config = dict(UNet2DConditionModel.load_config(pipeline_dir, subfolder="unet"))
    config.update(block_out_channels=blocks, attention_head_dim=(blocks[0] // 16, blocks[1] // 16))
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config)


def _engine_step_seconds(model, adapter, pairs, out: Path, steps: int, **cfg: Any) -> tuple[list[float], list[float]]:
    """Train ``steps + WARMUP`` optimizer steps; (wall, process-CPU) seconds of the last ``steps`` steps,
    from timestamps taken by an engine callback after each optimizer step (and its logging)."""
    from mmalign.engine import TrainConfig, train

    stamps: list[tuple[float, float]] = []
    config = TrainConfig(**{"output_dir": str(out), "max_steps": steps + WARMUP, "batch_size": BATCH,
                            "learning_rate": 1e-5, "trackers": ["tensorboard"], "progress": False, "plot": False,
                            "save_every": 0, **cfg})
    train(model, adapter, pairs, config, callbacks=[lambda info: stamps.append((time.perf_counter(),
                                                                                  time.process_time()))])
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP - 1:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP - 1:]
    return wall, cpu


def _peer_module(args: argparse.Namespace):
    folder = getattr(args, "peer", None) or os.environ.get("MMALIGN_PEER_DIR")
    if not folder:
        return None, "not run: pass --peer DIR (or MMALIGN_PEER_DIR) holding train_diffusion_dpo.py and run_peer.py"
    runner = Path(folder) / "run_peer.py"
    if not runner.is_file() or not (Path(folder) / "train_diffusion_dpo.py").is_file():
        return None, f"not run: {folder} lacks run_peer.py or train_diffusion_dpo.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmalign_bench_run_peer", runner)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(folder)


def bench_vs_peer(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from diffusion.adapter import DiffusionAdapter
    from diffusion.cache import build_cache
    from diffusion.train import load_pipeline
    from mmalign.pairs import read_pairs
    from mmalign.tiny import cached_tiny

    peer, peer_note = _peer_module(args)
    steps = args.steps
    pipeline_dir = cached_tiny("sd")
    peer_data, ours_data = make_datasets(tmp, BATCH * (steps + WARMUP + 3))
    pairs = read_pairs(ours_data)
    pipe = load_pipeline("tiny:sd")
    adapter_plain = DiffusionAdapter(pipe, resolution=RESOLUTION)
    t = time.perf_counter()
    build_cache(adapter_plain, pairs, tmp / "cache")
    cache_seconds = time.perf_counter() - t
    adapter_cached = DiffusionAdapter(pipe, resolution=RESOLUTION, cache_dir=tmp / "cache")
    lora = {"loss": "diffusion_dpo", "loss_kwargs": {"beta": 5000.0}, "reference": "lora_disabled",
            "lora_r": RANK, "lora_alpha": float(RANK), "weight_decay": 1e-2, "max_grad_norm": 1.0}

    def ours(adapter):
        return lambda out: _engine_step_seconds(_fresh_unet(pipeline_dir), adapter, pairs, out, steps, **lora)

    contenders = {"ours_cached": ours(adapter_cached), "ours_uncached": ours(adapter_plain)}
    if peer is not None:
        contenders["peer"] = lambda out: peer.run_peer(pipeline_dir, peer_data, out, batch_size=BATCH,
                                                       resolution=RESOLUTION, rank=RANK, steps=steps, warmup=WARMUP)
    names = list(contenders)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            w, c = contenders[name](tmp / f"run-{name}-{r}")
            wall[name].append(statistics.median(w))
            cpu[name].append(statistics.median(c))
            print(f"[diffusion] repeat {r} {name}: {wall[name][-1]:.4f} s/step wall, {cpu[name][-1]:.4f} cpu",
                  flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out: dict[str, Any] = {
        "setup": (f"tiny SD1.5-shaped pipeline (mmalign.tiny cached_tiny('sd')), {BATCH} pairs/step, "
                  f"{RESOLUTION} px, LoRA r={RANK} alpha={RANK} on to_q/to_k/to_v/to_out.0, AdamW wd 1e-2, "
                  "grad clip 1.0, fp32, tensorboard logging on both, LoRA-disabled reference"),
        "peer": "diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py; " + peer_note,
        "timing": (f"per optimizer step, median of {steps} steps after {WARMUP} warm-up steps per run, then median "
                   f"over {args.repeats} repeats; contenders alternate (rotated order) in one process. 'wall' is "
                   "wall-clock; 'cpu' is process CPU time (1 torch thread), less sensitive to other jobs sharing "
                   "the 2 cores; paired ratios are medians of the per-repeat ratios"),
        "cache_build_seconds": cache_seconds,
        "seconds_per_step_wall": med,
        "seconds_per_step_cpu": med_cpu,
        "wall_each_repeat": wall,
        "cpu_each_repeat": cpu,
    }
    if "peer" in med:
        for label, table in (("wall", wall), ("cpu", cpu)):
            for ours in ("cached", "uncached"):
                ratios = [p / o for p, o in zip(table["peer"], table[f"ours_{ours}"], strict=True)]
                out[f"speedup_{ours}_vs_peer_{label}"] = statistics.median(ratios)
        out["goal"] = "speedup (peer s/step / ours s/step): cached >= 1.3, uncached >= 1.0"
        out["goal_met_cpu"] = bool(out["speedup_cached_vs_peer_cpu"] >= 1.3 and out["speedup_uncached_vs_peer_cpu"] >= 1.0)
        out["goal_met_wall"] = bool(out["speedup_cached_vs_peer_wall"] >= 1.3
                                    and out["speedup_uncached_vs_peer_wall"] >= 1.0)
    return out


# ----------------------------------------------------------------------------------------- MaPO vs DPO


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_run(objective: str, cache_dir: str, pairs_dir: str, steps: int, threads: int, out_dir: str,
              setting: str = "adamw", profile_tensors: bool = False) -> dict:
    """One full fine-tuning run in this (fresh) process: step seconds and peak-RSS increase, or (with
    ``profile_tensors``, under the torch profiler, not timed) the peak increase of live tensor bytes."""
    torch.set_num_threads(threads)
    from diffusion.adapter import DiffusionAdapter
    from diffusion.train import load_pipeline
    from mmalign.pairs import read_pairs
    from mmalign.tiny import cached_tiny

    pipe = load_pipeline("tiny:sd")
    adapter = DiffusionAdapter(pipe, resolution=RESOLUTION, cache_dir=cache_dir)
    pairs = read_pairs(pairs_dir)
    overrides = dict(SETTINGS[setting][0])
    blocks = tuple(overrides.pop("unet_blocks", WIDE_BLOCKS))
    model = _fresh_unet(cached_tiny("sd"), blocks=blocks)
    n_params = sum(p.numel() for p in model.parameters())
    if objective == "mapo":
        cfg = {"loss": "mapo", "loss_kwargs": {"beta": 0.1, "scale": 0.5,
                                               "num_train_timesteps": adapter.num_train_timesteps}}
    else:
        cfg = {"loss": "diffusion_dpo", "loss_kwargs": {"beta": 5000.0}, "reference": "frozen"}
    cfg.update(overrides)
    if profile_tensors:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _engine_step_seconds(model, adapter, pairs, Path(out_dir), steps, **cfg)
        return {"tensor_peak_increase_bytes": _tensor_peak_increase(prof), "unet_params": n_params,
                "unet_weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    base_rss = _proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    wall, cpu = _engine_step_seconds(model, adapter, pairs, Path(out_dir), steps, **cfg)
    peak = _proc_status("VmHWM")
    return {"seconds_per_step": statistics.median(wall), "cpu_seconds_per_step": statistics.median(cpu),
            "peak_increase_bytes": peak - base_rss,
            "base_rss_bytes": base_rss, "peak_rss_bytes": peak, "unet_params": n_params}


def _tensor_peak_increase(prof) -> int:
    """Peak of live tensor bytes (CPU allocator) over the profiled run, relative to its start: the
    CPU analogue of ``torch.cuda.max_memory_allocated``. Every profiled op's self allocation net of its
    own frees, plus the allocator events outside ops, summed in time order; a transient that an op
    allocates and frees inside itself is not seen (op granularity), the same for both contenders."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def bench_mapo(args: argparse.Namespace, tmp: Path, setting: str = "adamw") -> dict[str, Any]:
    from diffusion.adapter import DiffusionAdapter
    from diffusion.cache import build_cache
    from diffusion.train import load_pipeline
    from mmalign.pairs import read_pairs

    pairs_dir = tmp / "pairs"
    if not pairs_dir.is_dir():
        make_datasets(tmp, BATCH * (args.steps + WARMUP + 3))
    cache_dir = tmp / "cache"
    if not (cache_dir / "index.json").is_file():
        build_cache(DiffusionAdapter(load_pipeline("tiny:sd"), resolution=RESOLUTION), read_pairs(pairs_dir), cache_dir)

    def child(name: str, run_dir: str, steps: int, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.diffusion", "--child", name, "--cache", str(cache_dir),
               "--pairs", str(pairs_dir), "--steps", str(steps), "--threads", str(args.threads),
               "--out", str(tmp / run_dir), "--setting", setting, *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"child {name} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # Live tensor bytes are deterministic for a given run, so one profiled run each is enough.
    tensors = {name: child(name, f"prof-{setting}-{name}", 2, "--profile-tensors") for name in ("mapo", "dpo_frozen")}
    for name, t in tensors.items():
        print(f"[diffusion] {setting} {name}: +{t['tensor_peak_increase_bytes'] / 2**20:.1f} MiB live tensors at peak",
              flush=True)
    runs: dict[str, list[dict]] = {"mapo": [], "dpo_frozen": []}
    for r in range(args.repeats):
        order = ["mapo", "dpo_frozen"] if r % 2 == 0 else ["dpo_frozen", "mapo"]
        for name in order:
            result = child(name, f"mem-{setting}-{name}-{r}", args.steps)
            runs[name].append(result)
            print(f"[diffusion] {setting} repeat {r} {name}: {result['seconds_per_step']:.4f} s/step wall, "
                  f"{result['cpu_seconds_per_step']:.4f} cpu, "
                  f"+{result['peak_increase_bytes'] / 2**20:.1f} MiB peak", flush=True)
    train_total = {k: v["unet_weight_bytes"] + v["tensor_peak_increase_bytes"] for k, v in tensors.items()}
    sec = {k: statistics.median(x["seconds_per_step"] for x in v) for k, v in runs.items()}
    sec_cpu = {k: statistics.median(x["cpu_seconds_per_step"] for x in v) for k, v in runs.items()}
    paired = {label: statistics.median(m[key] / d[key] for m, d in zip(runs["mapo"], runs["dpo_frozen"], strict=True))
              for label, key in (("wall", "seconds_per_step"), ("cpu", "cpu_seconds_per_step"),
                                 ("memory", "peak_increase_bytes"))}
    mem = {k: statistics.median(x["peak_increase_bytes"] for x in v) for k, v in runs.items()}
    peak = {k: statistics.median(x["peak_rss_bytes"] for x in v) for k, v in runs.items()}
    return {
        "setup": (f"full fine-tuning of a random UNet2DConditionModel, tiny SD config with block_out_channels "
                  f"{SETTINGS[setting][0].get('unet_blocks', WIDE_BLOCKS)} ({runs['mapo'][0]['unet_params'] / 1e6:.2f}M "
                  f"params), {BATCH} pairs/step, "
                  f"{RESOLUTION} px (latents 4x16x16), caches on, fp32, {SETTINGS[setting][1]}; DPO reference = engine's "
                  "frozen copy"),
        "memory_method": ("tensor_*: peak of live tensor bytes over a profiled run (torch.profiler profile_memory, "
                          "op granularity; the CPU analogue of torch.cuda.max_memory_allocated) minus the bytes "
                          "live at its start; rss_*: fresh subprocess per run, peak RSS (VmHWM, reset via "
                          "/proc/self/clear_refs after loading pipeline, cache and UNet) minus RSS at that point "
                          "(also counts modules imported and allocator arenas grown during training)"),
        "unet_weight_MiB": tensors["mapo"]["unet_weight_bytes"] / 2**20,
        "tensor_peak_increase_MiB": {k: v["tensor_peak_increase_bytes"] / 2**20 for k, v in tensors.items()},
        # What a GPU would hold for training with the caches on (no VAE, no text encoders): the UNet's
        # weights plus what training adds. The goal is judged on this total, the stricter of the two.
        "tensor_training_total_MiB": {k: train_total[k] / 2**20 for k in train_total},
        "tensor_memory_ratio_mapo_vs_dpo": train_total["mapo"] / train_total["dpo_frozen"],
        "tensor_increase_ratio_mapo_vs_dpo": (tensors["mapo"]["tensor_peak_increase_bytes"]
                                              / tensors["dpo_frozen"]["tensor_peak_increase_bytes"]),
        "timing": ("wall and process-CPU seconds per optimizer step, median of the timed steps of a run, then "
                   "median over repeats (runs alternate); ratios are medians of per-repeat paired ratios"),
        "seconds_per_step_wall": sec,
        "seconds_per_step_cpu": sec_cpu,
        "rss_peak_increase_MiB": {k: v / 2**20 for k, v in mem.items()},
        "peak_rss_total_MiB": {k: v / 2**20 for k, v in peak.items()},
        "time_ratio_mapo_vs_dpo_wall": paired["wall"],
        "time_ratio_mapo_vs_dpo_cpu": paired["cpu"],
        "rss_memory_ratio_mapo_vs_dpo": paired["memory"],
        "total_peak_rss_ratio_mapo_vs_dpo": peak["mapo"] / peak["dpo_frozen"],
        "goal": "time <= 0.8, memory (peak live tensors for training: UNet weights + what training adds) <= 0.75",
        "goal_met_time_cpu": bool(paired["cpu"] <= 0.8),
        "goal_met_time_wall": bool(paired["wall"] <= 0.8),
        "goal_met_memory": bool(train_total["mapo"] / train_total["dpo_frozen"] <= 0.75),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------- entry


def _parse_extra(args: argparse.Namespace) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=None)
    ap.add_argument("--part", choices=["all", "peer", "mapo"], default="all")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="MaPO-vs-DPO settings, comma-separated")
    known, _ = ap.parse_known_args(getattr(args, "extra", []) or [])
    for k, v in vars(known).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def bench_diffusion(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    args = _parse_extra(args)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mmalign-bench-diffusion-") as tmp:
        if args.part in ("all", "peer"):
            out["dpo_lora_vs_diffusers_example"] = bench_vs_peer(args, Path(tmp))
        if args.part in ("all", "mapo"):
            for setting in args.settings.split(","):
                if setting not in SETTINGS:
                    raise SystemExit(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")
                key = "mapo_vs_dpo_frozen_full_ft" + ("" if setting == "adamw" else f"_{setting}")
                out[key] = bench_mapo(args, Path(tmp), setting)
    out["threads"] = args.threads
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer", default=None)
    ap.add_argument("--part", choices=["all", "peer", "mapo"], default="all")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="MaPO-vs-DPO settings, comma-separated")
    ap.add_argument("--child", choices=["mapo", "dpo_frozen"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="adamw", help=argparse.SUPPRESS)
    ap.add_argument("--profile-tensors", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_run(a.child, a.cache, a.pairs, a.steps, a.threads, a.out, a.setting,
                                   a.profile_tensors)))
    else:
        print(json.dumps(bench_diffusion(a), indent=2, default=str))
