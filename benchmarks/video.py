"""Video benchmark: frame sampling against a full decode, and shared video encoding in a DPO step.

    python scripts/bench.py video [--repeats 5] [--steps 4] [--batch 2]
    python -m benchmarks.video [--part sampling|step] ...      (prints only; from the repository root)

(a) Sampling (goal: >= 2x frames/s for 16 of 300 frames). Clips of 300 frames, 240x320: pan-and-zoom
    camera moves over four scikit-image photos, encoded with mpeg4 (keyframe every 12 frames) and one with
    libx264 at its default keyframe spacing (250) when PyAV has it. Ours: ``video.frames.load_clip`` with
    ``FrameSampling(num_frames=16)`` (probe, then seek to the keyframe before each wanted frame and decode on).
    Baseline: PyAV decodes every frame in order and converts the 16 wanted ones to RGB (only those: the
    strongest form of "decode all and subsample"). Frames/s = 16 / process CPU seconds per clip, median over
    repeats with min and max, contenders alternating; the ratio is per clip, then the median over clips.
(b) A DPO step with 16 frames per side on the tiny LLaVA-NeXT-Video (``tiny:llava_next_video``, full
    fine-tuning, frozen reference copy, AdamW), ``--batch`` pairs per step, every pair its own clip, the same
    clip on both sides. Shared encoding on: both sides name the same file, so the adapter encodes the clip
    once per pair (and the reference once more); off: the rejected side names a byte-identical copy, so each
    side is decoded, processed and encoded on its own (what a pipeline without sharing does). Vision-tower
    time: forward hooks on the tower, and its backward from the first gradient at its outputs to the last
    gradient of its parameters (the patch embedding's, after the class and position embeddings': ending the
    window at the first parameter would leave the convolution's backward out), process CPU seconds, summed
    over the step. The saving is given from the medians over all steps and per repeat (mean, min, max,
    stdev: the spread between runs). Why it stays below 50%: every tower call has a cost that does not grow
    with the number of clips (the Python dispatch of its ~30 modules, ~3 ms a forward on this CPU even for
    one frame, about two clips' worth of the tiny tower's compute); sharing halves the clips, not the calls
    (one per pass already: policy forward, its backward, reference forward).
    Per pair: step CPU time / batch; peak memory = peak live tensor bytes of one step above those live at
    its start (the profiler's allocator events, as in the diffusion and memory sections). Goal: sharing
    saves >= 40% of the vision-tower time. Medians over repeats, settings alternating, the first
    step of each repeat left out (warm-up).

All on one torch thread (``--threads``); CPU seconds, since wall time on a shared machine is noise (it is
recorded too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULTS = {"repeats": 5, "steps": 4, "batch": 4}
SAMPLED, TOTAL, SIZE = 16, 300, (240, 320)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ---------------------------------------------------------------- (a) sampling


def _clips(folder: Path) -> dict[str, Path]:
    import av
    from skimage import data

    from video.frames import write_video
    from video.synthetic import pan_zoom_clip

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    clips = {}
    for name, photo in photos.items():
        frames = pan_zoom_clip(photo, TOTAL, size=SIZE)
        clips[f"{name}_mpeg4_gop12"] = write_video(folder / f"{name}.mp4", frames, fps=30, gop_size=12,
                                                   bit_rate=2_000_000)
    if "libx264" in av.codecs_available:
        frames = pan_zoom_clip(data.astronaut(), TOTAL, size=SIZE)
        clips["astronaut_x264_gop250"] = write_video(folder / "astronaut_x264.mp4", frames, fps=30, codec="libx264",
                                                     gop_size=250, bit_rate=2_000_000)
    return clips


def _full_decode(path: Path, wanted: list[int]) -> list[Any]:
    """Decode every frame in order; convert the wanted ones to RGB."""
    import av

    keep = set(wanted)
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                out.append(frame.to_ndarray(format="rgb24"))
    return out


def bench_sampling(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import numpy as np

    from video.frames import DecodeStats, FrameSampling, load_clip

    sampling = FrameSampling(num_frames=SAMPLED)
    wanted = sampling.indices(TOTAL, 30.0)
    per_clip: dict[str, Any] = {}
    for name, path in _clips(tmp).items():
        ours_fps, full_fps, stats = [], [], DecodeStats()
        check = load_clip(path, sampling)  # same frames as the full decode
        assert np.array_equal(check.frames.permute(0, 2, 3, 1).numpy(), np.stack(_full_decode(path, wanted)))
        for _ in range(args.repeats):
            cpu = time.process_time()
            load_clip(path, sampling, stats=stats)
            ours_fps.append(SAMPLED / (time.process_time() - cpu))
            cpu = time.process_time()
            _full_decode(path, wanted)
            full_fps.append(SAMPLED / (time.process_time() - cpu))
        per_clip[name] = {
            "ours_frames_per_s": _spread(ours_fps),
            "full_decode_frames_per_s": _spread(full_fps),
            "ratio": statistics.median(ours_fps) / statistics.median(full_fps),
            "ours_decoded_frames_per_clip": stats.decoded / args.repeats,
            "ours_seeks_per_clip": stats.seeks / args.repeats,
        }
    ratios = [c["ratio"] for c in per_clip.values()]
    return {"goal": ">= 2x frames/s for 16 of 300 frames", "clip": f"{TOTAL} frames, {SIZE[0]}x{SIZE[1]}",
            "repeats": args.repeats, "per_clip": per_clip, "ratio_median_over_clips": statistics.median(ratios),
            "ratio_min_over_clips": min(ratios), "goal_met": min(ratios) >= 2.0}


# ---------------------------------------------------------------- (b) training step


class _TowerTimer:
    """Process CPU seconds spent in a module's forward (pre/post forward hooks) and backward.

    Backward runs from the first gradient reaching one of the module's outputs (tensor hooks set in the
    forward hook) to the last gradient of its parameters (a hook on every parameter; the patch embedding's
    convolution is the last op autograd runs there, after the class and position embeddings' gradients), and
    is added up by :meth:`finish` once ``backward()`` has returned. Autograd runs the tower's nodes one after
    another (nothing of the language model lies between them: the tower's ops were recorded first, so they run
    last), so the window holds the tower's backward only."""

    def __init__(self, module: Any) -> None:
        self.forward = self.backward = 0.0
        self.calls = 0
        self._start = 0.0
        self._bstart: float | None = None
        self._bend: float | None = None
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]
        for param in module.parameters():
            if param.requires_grad:
                self.handles.append(param.register_hook(self._param_grad))

    def _pre(self, *_: Any) -> None:
        self._start = time.process_time()

    def _post(self, module: Any, inputs: Any, output: Any) -> None:
        import torch

        self.forward += time.process_time() - self._start
        self.calls += 1
        tensors = [output] if isinstance(output, torch.Tensor) else [
            t for v in (output.values() if hasattr(output, "values") else output)
            for t in (v if isinstance(v, tuple | list) else [v]) if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.requires_grad:
                t.register_hook(self._bbegin)

    def _bbegin(self, grad: Any) -> None:
        if self._bstart is None:
            self._bstart = time.process_time()

    def _param_grad(self, grad: Any) -> None:
        self._bend = time.process_time()

    def finish(self) -> None:
        """Add the backward window of the ``backward()`` call that has just returned."""
        if self._bstart is not None and self._bend is not None and self._bend > self._bstart:
            self.backward += self._bend - self._bstart
        self._bstart = self._bend = None

    def reset(self) -> None:
        self.forward = self.backward = 0.0
        self.calls = 0
        self._bstart = self._bend = None


def _step_pairs(folder: Path, n: int, shared: bool) -> list[Any]:
    from mmalign.pairs import PreferencePair
    from video.frames import write_video
    from video.synthetic import moving_square_clip

    pairs = []
    for i in range(n):
        clip = folder / f"clip{i}.mp4"
        if not clip.exists():
            color = ((60 * i) % 256, (255 - 40 * i) % 256, (90 + 70 * i) % 256)
            write_video(clip, moving_square_clip(32, size=(64, 96), square=16, color=color), fps=16)
        rejected = clip
        if not shared:
            rejected = folder / f"clip{i}_copy.mp4"
            if not rejected.exists():
                shutil.copyfile(clip, rejected)
        pairs.append(PreferencePair(f"p{i}", "what moves in the video", "a square moves to the right",
                                    "a cat sleeps on a sofa", [clip.name], [rejected.name]).with_root(folder))
    return pairs


def bench_step(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.diffusion import _tensor_peak_increase
    from mmalign.losses import dpo
    from video.adapter import VideoLLMAdapter
    from video.frames import FrameSampling
    from vision.train import load_vlm

    torch.manual_seed(0)
    policy, processor = load_vlm("tiny:llava_next_video")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    tower = policy.model.vision_tower
    timer = _TowerTimer(tower)
    ref_timer = _TowerTimer(reference.model.vision_tower)
    n_pairs = args.batch * (args.steps + 1)
    settings = {}
    for name, shared in (("shared_on", True), ("shared_off", False)):
        adapter = VideoLLMAdapter(processor, sampling=FrameSampling(num_frames=16))
        pairs = _step_pairs(tmp / "step", n_pairs, shared)
        settings[name] = (adapter, pairs)

    def step(adapter: Any, batch_pairs: list[Any]) -> None:
        batch = adapter.collate(batch_pairs)
        with torch.no_grad():
            ref = adapter.logps(reference, batch)
        pol = adapter.logps(policy, batch)
        loss = dpo(pol.chosen, pol.rejected, ref.chosen, ref.rejected, beta=0.1).losses.mean()
        loss.backward()
        timer.finish()
        ref_timer.finish()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for adapter, pairs in settings.values():  # fill the frame caches (as check_videos does before training)
        for pair in pairs:
            adapter.clip(pair, "chosen")
            adapter.clip(pair, "rejected")
    runs: dict[str, dict[str, list[float]]] = {n: {"step_cpu_s_per_pair": [], "step_wall_s_per_pair": [],
                                                    "tower_forward_cpu_s_per_pair": [],
                                                    "tower_backward_cpu_s_per_pair": [],
                                                    "ref_tower_forward_cpu_s_per_pair": [],
                                                    "tower_calls_per_step": []} for n in settings}
    repeat_tower: dict[str, list[float]] = {n: [] for n in settings}  # tower CPU s per pair, one per repeat
    for _ in range(args.repeats):
        for name, (adapter, pairs) in settings.items():
            tower_s = 0.0
            for s in range(args.steps + 1):
                batch_pairs = pairs[s * args.batch : (s + 1) * args.batch]
                timer.reset()
                ref_timer.reset()
                wall, cpu = time.perf_counter(), time.process_time()
                step(adapter, batch_pairs)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if s == 0:
                    continue  # warm-up
                r = runs[name]
                r["step_cpu_s_per_pair"].append(cpu / args.batch)
                r["step_wall_s_per_pair"].append(wall / args.batch)
                r["tower_forward_cpu_s_per_pair"].append(timer.forward / args.batch)
                r["tower_backward_cpu_s_per_pair"].append(timer.backward / args.batch)
                r["ref_tower_forward_cpu_s_per_pair"].append(ref_timer.forward / args.batch)
                r["tower_calls_per_step"].append(timer.calls)
                tower_s += timer.forward + timer.backward + ref_timer.forward
            repeat_tower[name].append(tower_s / (args.steps * args.batch))
    figures: dict[str, Any] = {}
    for name, (adapter, pairs) in settings.items():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(adapter, pairs[: args.batch])
        out = {k: _spread(v) for k, v in runs[name].items()}
        out["peak_memory_mib_per_pair"] = _tensor_peak_increase(prof) / args.batch / 2**20
        figures[name] = out
    for t in (timer, ref_timer):
        for h in t.handles:
            h.remove()

    def total(name: str) -> float:
        m = figures[name]
        return sum(m[k]["median"] for k in ("tower_forward_cpu_s_per_pair", "tower_backward_cpu_s_per_pair",
                                            "ref_tower_forward_cpu_s_per_pair"))

    saving = 1 - total("shared_on") / total("shared_off")
    # the saving of each repeat (its steps' tower time, on against off, measured minutes apart at most)
    per_repeat = [1 - on / off for on, off in zip(repeat_tower["shared_on"], repeat_tower["shared_off"], strict=True)]
    return {
        "goal": "shared encoding saves >= 40% of the vision-tower time on pairs that share a video",
        "model": "tiny:llava_next_video, full fine-tuning, frozen reference copy, AdamW",
        "frames_per_side": 16, "pairs_per_step": args.batch, "steps_per_repeat": args.steps,
        "repeats": args.repeats, **figures,
        "vision_tower_cpu_s_per_pair": {"shared_on": total("shared_on"), "shared_off": total("shared_off")},
        "vision_tower_saving": saving,
        "vision_tower_saving_per_repeat": {
            "values": per_repeat, "mean": statistics.mean(per_repeat), "min": min(per_repeat), "max": max(per_repeat),
            "stdev": statistics.stdev(per_repeat) if len(per_repeat) > 1 else 0.0,
        },
        "step_cpu_saving": 1 - figures["shared_on"]["step_cpu_s_per_pair"]["median"]
        / figures["shared_off"]["step_cpu_s_per_pair"]["median"],
        "peak_memory_saving": 1 - figures["shared_on"]["peak_memory_mib_per_pair"]
        / figures["shared_off"]["peak_memory_mib_per_pair"],
        "goal_met": saving >= 0.4,
    }


def _parse(extra: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["sampling", "step", "all"], default="all")
    return ap.parse_args(extra)


def bench_video(args: argparse.Namespace) -> dict[str, Any]:
    """Run (a) and (b) (or ``--part``); returns the figures (see the module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    part = _parse(getattr(args, "extra", [])).part
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if part in ("sampling", "all"):
            figures["sampling"] = bench_sampling(args, Path(tmp))
        if part in ("step", "all"):
            figures["training_step"] = bench_step(args, Path(tmp))
    return figures


if __name__ == "__main__":
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in {**DEFAULTS, "threads": 1}.items():
        ap.add_argument(f"--{key}", type=int, default=value)
    known, rest = ap.parse_known_args()
    known.extra = rest
    print(json.dumps(bench_video(known), indent=2))
