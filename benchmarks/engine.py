"""Engine benchmarks.

``python scripts/bench.py engine``: cost of a DPO step relative to a bare policy forward+backward.
Goal: with precomputed reference log-probs a DPO step costs at most 1.1x a pure policy
forward+backward on the same batch; with a frozen reference copy at most 1.45x. The model is a
randomly initialised Llama, larger than the test models so that compute, not Python overhead,
dominates (hidden 256, 4 layers, vocab ~670, 2x8 rows of ~40 tokens). The baseline is measured in the
same process, alternating with the engine runs; medians over repeats.

``python scripts/bench.py data``: the engine's data loading on real photos (scikit-image's sample
photos, saved as JPEG with the short side 336 px) through a LLaVA-1.5-style processor (CLIP image
processor: resize and centre-crop to 336 px, normalise; 576 image tokens per image) and a tiny LLaVA
whose vision tower takes 336 px images (patch 14). For ``num_workers`` 0 and 2: the fraction of step
time the training loop waits for its next batch (decode, process, tokenise) and pairs per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmalign.engine import TrainConfig, train
from mmalign.text import CausalLMAdapter
from mmalign.tiny import make_tiny_tokenizer
from mmalign.toy import colour_pairs


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(flavour="llava")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg), tok


def _pairs(n: int, repeat: int):
    train_pairs, held = colour_pairs(seed=0)
    # longer responses: the colour answer repeated (6 -> ~40 tokens a row, 20 -> ~128)
    pairs = [dataclasses.replace(p, id=f"{p.id}-{i}", chosen=(p.chosen + " and ") * repeat,
                                 rejected=(p.rejected + " and ") * repeat)
             for i in range(4) for p in train_pairs + held]
    return pairs[:n]


def _baseline_step(model, adapter, batch, opt) -> float:
    t = time.perf_counter()
    out = adapter.logps(model, batch)
    (out.chosen.sum() + out.rejected.sum()).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _workload(repeat: int, max_length: int, repeats: int, steps: int) -> dict:
    bs, warm = 8, 3
    pairs = _pairs(bs * (steps + warm), repeat)
    model, tok = _model()
    adapter = CausalLMAdapter(tok, max_length=max_length)
    batch = adapter.collate(pairs[:bs])
    results: dict[str, list[float]] = {"fwd_bwd": [], "fwd_bwd_adamw": [], "precomputed": [], "frozen": []}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # what the engine builds for plain CPU parameters
    for _ in range(repeats):
        for _ in range(warm):
            _baseline_step(model, adapter, batch, None)
        results["fwd_bwd"].append(statistics.median(_baseline_step(model, adapter, batch, None) for _ in range(steps)))
        results["fwd_bwd_adamw"].append(statistics.median(_baseline_step(model, adapter, batch, opt)
                                                          for _ in range(steps)))
        for mode in ("precomputed", "frozen"):
            m, _ = _model()
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(output_dir=str(Path(tmp) / "run"), reference=mode, max_steps=steps + warm,
                                  batch_size=bs, learning_rate=1e-6, trackers=[], progress=False, plot=False,
                                  ref_cache_dir=tmp, save_every=10**6, max_grad_norm=0.0)
                res = train(m, adapter, pairs, cfg)
            secs = [r["seconds"] for r in res.metrics]
            per_step = [b - a for a, b in zip(secs[warm - 1 :], secs[warm:], strict=False)]
            results[mode].append(statistics.median(per_step))
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "batch": f"{bs} pairs (2x{bs} rows, ~{int(batch['attention_mask'].sum(1).float().mean())} tokens each)",
        "seconds": med,
        "ratio_precomputed_vs_fwd_bwd": med["precomputed"] / med["fwd_bwd"],
        "ratio_frozen_vs_fwd_bwd": med["frozen"] / med["fwd_bwd"],
        "ratio_precomputed_vs_fwd_bwd_adamw": med["precomputed"] / med["fwd_bwd_adamw"],
        "ratio_frozen_vs_fwd_bwd_adamw": med["frozen"] / med["fwd_bwd_adamw"],
        "adamw_share_of_fwd_bwd": (med["fwd_bwd_adamw"] - med["fwd_bwd"]) / med["fwd_bwd"],
    }


def bench_engine(args: argparse.Namespace) -> dict:
    repeats, steps = getattr(args, "repeats", 5), getattr(args, "steps", 10)
    torch.set_num_threads(getattr(args, "threads", 1))
    return {
        "model": "Llama hidden 256, 4 layers, random init; AdamW (fused kernel, as the engine builds it)",
        "repeats": repeats,
        "steps_per_repeat": steps,
        "timing": "engine: median step-to-step time from its metrics after 3 warm-up steps (collate, forward, "
                  "reference, loss, backward, AdamW, metrics); baselines: the adapter's forward + backward "
                  "(and AdamW) on one fixed batch; medians over repeats, contenders alternating",
        "short_rows": _workload(6, 64, repeats, steps),
        "long_rows": _workload(20, 160, repeats, steps),
        "goal": "precomputed <= 1.1x, frozen <= 1.45x of fwd+bwd",
    }


#: scikit-image sample photos (bundled with the package: no download)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
          "colorwheel")
IMAGE_SIZE = 336


def _photo_pairs(folder: Path, n: int) -> list:
    """``n`` pairs over the photos (saved once as JPEG, short side 336 px); each pair names one photo."""
    import skimage.data
    from PIL import Image

    from mmalign.pairs import PreferencePair, read_pairs, write_pairs

    (folder / "media").mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = IMAGE_SIZE / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        img.save(folder / "media" / f"{name}.jpg", quality=90)
    pairs = [PreferencePair(f"p{i}", "Describe the photo in one sentence.", f"A photo of a {PHOTOS[i % 8]}.",
                            "A drawing of a red car on a bridge.", [f"media/{PHOTOS[i % 8]}.jpg"], [])
             for i in range(n)]
    write_pairs(folder, pairs)
    return read_pairs(folder)


def _llava_336(seed: int = 0) -> tuple[Any, Any]:
    """The tiny LLaVA with LLaVA-1.5's image geometry: 336 px images, patch 14 (576 image tokens), its
    processor's CLIP image processor resizing and centre-cropping to 336 px. Randomly initialised."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmalign.tiny import cached_tiny
    from vision.train import load_vlm

    path = cached_tiny("llava")
    _, processor = load_vlm(path)
    processor.image_processor.size = {"shortest_edge": IMAGE_SIZE}
    processor.image_processor.crop_size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor.patch_size = 14
    config = AutoConfig.from_pretrained(path)
    config.vision_config.image_size, config.vision_config.patch_size = IMAGE_SIZE, 14
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config), processor


class _Timed:
    """The adapter, with the moment each batch reaches the training loop (``prepare`` is called right
    after the loader hands it over)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.value_kind = inner, inner.value_kind
        self.lora_target_modules = getattr(inner, "lora_target_modules", None)
        self.arrived: list[float] = []
        self.arrived_cpu: list[float] = []

    def collate(self, pairs: list) -> dict:
        return self.inner.collate(pairs)

    def prepare(self, batch: dict, *, generator: torch.Generator) -> dict:
        self.arrived.append(time.perf_counter())
        self.arrived_cpu.append(time.process_time())
        return self.inner.prepare(batch, generator=generator)

    def logps(self, model: Any, batch: dict) -> Any:
        return self.inner.logps(model, batch)


def _data_run(pairs: list, workers: int, batch: int, steps: int, warm: int) -> dict:
    from vision.adapter import VLMAdapter

    model, processor = _llava_336()
    adapter = _Timed(VLMAdapter(processor, media_root=pairs[0].root))
    ended: list[float] = []
    ended_cpu: list[float] = []

    def step_ended(_info: Any) -> None:
        ended.append(time.perf_counter())
        ended_cpu.append(time.process_time())

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output_dir=str(Path(tmp) / "run"), max_steps=warm + steps, batch_size=batch, lora_r=8,
                          learning_rate=1e-4, num_workers=workers, trackers=[], progress=False, plot=False,
                          save_every=10**6, max_grad_norm=0.0)
        train(model, adapter, pairs, cfg, callbacks=[step_ended])
    # step i waits from the end of step i-1 until its batch arrives; the first `warm` steps are left out
    waits = [adapter.arrived[i] - ended[i - 1] for i in range(warm, warm + steps)]
    span = ended[warm + steps - 1] - ended[warm - 1]
    # the same in the training process's CPU time: robust to other jobs on the machine (a blocked wait
    # for a worker's batch costs none)
    waits_cpu = [adapter.arrived_cpu[i] - ended_cpu[i - 1] for i in range(warm, warm + steps)]
    span_cpu = ended_cpu[warm + steps - 1] - ended_cpu[warm - 1]
    return {"wait_fraction": sum(waits) / span, "pairs_per_second": batch * steps / span,
            "step_seconds": span / steps, "wait_seconds_per_step": sum(waits) / steps,
            "main_process_cpu_wait_fraction": sum(waits_cpu) / span_cpu,
            "main_process_cpu_seconds_per_step": span_cpu / steps}


def bench_data(args: argparse.Namespace) -> dict:
    repeats, steps = getattr(args, "repeats", 3), getattr(args, "steps", 10)
    batch, warm = getattr(args, "batch", 8), 2
    torch.set_num_threads(getattr(args, "threads", 1))
    with tempfile.TemporaryDirectory() as tmp:
        pairs = _photo_pairs(Path(tmp) / "pairs", batch * (steps + warm))
        runs: dict[int, list[dict]] = {0: [], 2: []}
        for _ in range(repeats):
            for workers in runs:  # alternating, so a busy moment of the machine hits both
                runs[workers].append(_data_run(pairs, workers, batch, steps, warm))
    out = {
        "photos": f"skimage.data {', '.join(PHOTOS)}; JPEG, short side {IMAGE_SIZE} px",
        "processor": f"LLaVA-1.5 style: CLIP image processor to {IMAGE_SIZE}x{IMAGE_SIZE}, patch 14 (576 image "
                     "tokens), the tiny LLaVA's tokenizer and chat template",
        "model": "tiny LLaVA (hidden 32) with a 336 px vision tower, random init; DPO, LoRA r=8, reference = LoRA "
                 "disabled",
        "batch": f"{batch} pairs per step, one image each",
        "repeats": repeats,
        "steps_per_repeat": steps,
        "timing": "wait = from the end of a step (its callback) until the next batch reaches the loop; fraction "
                  "= waits / step-to-step time (wall clock; and in the training process's CPU time, which other "
                  "jobs on the machine do not inflate), after 2 warm-up steps; medians over repeats",
    }
    for workers, rows in runs.items():
        out[f"num_workers_{workers}"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["speedup_pairs_per_second_2_vs_0"] = (out["num_workers_2"]["pairs_per_second"]
                                              / out["num_workers_0"]["pairs_per_second"])
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data", action="store_true", help="the data-loading benchmark instead")
    args = ap.parse_args()
    print(bench_data(args) if args.data else bench_engine(args))
