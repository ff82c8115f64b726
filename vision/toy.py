"""Toy evidence for STIC on a tiny VLM: coloured squares, SFT, stage 1 pairs, stage 2 DPO, held-out margins.

:func:`run_stic_toy` does, with nothing downloaded:

1. **Data.** 32x32 images of a coloured square (random size and place, slightly varied shades) on a
   background of another colour; the description is ``"a {square} square on a {background} background"``
   (:func:`describe_square`), six colours, 30 combinations. Three disjoint image sets: SFT images
   (labelled), STIC images (unlabelled: only the pixels go to stage 1) and held-out images.
2. **SFT.** The tiny LLaVA (random init, :func:`mmalign.tiny.make_tiny_llava`) learns to describe the
   SFT images through the engine (``loss="sft"``, full fine-tuning), under plain describe prompts and
   STIC's step-by-step prompt. This is the "base model" the STIC run starts from.
3. **STIC stage 1** (:func:`vision.stic.build_stic_pairs`) on the unlabelled images: chosen = the
   model's description of the clean image (step-by-step prompt, temperature 0.2), rejected = its
   description under a hallucination prompt or of a corrupted image (``stic_lowres``/``stic_color_jitter``).
   ``stic_lowres`` goes to ``lowres_size`` = 8 px (a quarter of the model's 32 px input; STIC's 20 px on a
   336 px LLaVA input is a sixteenth; 20 px barely changes a 32 px image).
4. **CHES filter** (``ches_drop_fraction``, default 0.3): the stage-1 pairs with the highest
   length-normalised CHES under the SFT model (:func:`mmalign.diagnostics.filter_by_ches`, Razin et al.
   2024), the ones most prone to likelihood displacement, are dropped; the rest go to
   ``out_dir/stic_pairs_ches``.
5. **STIC stage 2** (:func:`vision.stic.train_stic_dpo`): DPO (beta 0.1) + chosen NLL / 1024, reference =
   a frozen copy of the SFT model.
6. **Held-out measures**, SFT model ("before") vs DPO model ("after"), on held-out images and both
   corruptions of each, where ``y_true`` is the true description and ``y_corrupt`` the SFT model's greedy
   description of the corrupted image (fixed text for both models):

   * ``text_margin``: ``logp(y_true | clean) - logp(y_corrupt | clean)`` over items whose ``y_corrupt``
     differs from ``y_true`` (does the model prefer the right text for the clean image?);
   * ``pair_margin``: ``logp(y_true | clean) - logp(y_corrupt | corrupted image)`` over all items (the
     quantity STIC's DPO term raises); ``implicit_reward_margin`` is ``beta`` times its change
     (:func:`mmalign.engine.evaluate` with the SFT model as reference);
   * greedy exact-match accuracy of clean-image descriptions (the model still describes correctly).

Logs-probs are summed over response tokens (incl. eos), as the adapter scores them.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["COLOURS", "ToyConfig", "describe_square", "run_stic_toy", "square_image", "square_images"]

#: Colour name -> RGB; names are single tokens of the tiny tokenizer.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 170, 50),
    "blue": (35, 60, 210),
    "yellow": (225, 215, 40),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
}
EVAL_PROMPT = "Describe the image."


def describe_square(square: str, background: str) -> str:
    """The true description, e.g. ``"a red square on a blue background"``."""
    return f"a {square} square on a {background} background"


def square_image(
    square: str, background: str, rng: np.random.Generator, size: int = 32, sides: tuple[int, int] | None = None
) -> Any:
    """A ``size`` x ``size`` RGB PIL image: a ``square``-coloured square on ``background``.

    The side is drawn uniformly from ``sides`` (inclusive; default ``(size // 3, size // 2)``).
    """
    from PIL import Image

    def shade(name: str) -> np.ndarray:
        return np.clip(np.array(COLOURS[name]) + rng.integers(-15, 16, 3), 0, 255)

    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = shade(background)
    low, high = sides or (size // 3, size // 2)
    if not 1 <= low <= high <= size:
        raise ValueError(f"square sides must satisfy 1 <= low <= high <= {size}, got {(low, high)}")
    side = int(rng.integers(low, high + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    pixels[top : top + side, left : left + side] = shade(square)
    return Image.fromarray(pixels)


def square_images(n: int, seed: int, sides: tuple[int, int] | None = None) -> list[tuple[Any, str, str]]:
    """``n`` images ``(PIL image, square colour, background colour)``, cycling through all 30 combinations."""
    rng = np.random.default_rng(seed)
    combos = [(s, b) for s in COLOURS for b in COLOURS if s != b]
    random.Random(seed).shuffle(combos)
    return [(square_image(*combos[i % len(combos)], rng, sides=sides), *combos[i % len(combos)]) for i in range(n)]


@dataclass
class ToyConfig:
    """Sizes and steps of the toy run (defaults: a few minutes on one CPU thread)."""

    out_dir: str = "runs/toy_vision"
    n_sft: int = 240
    n_stic: int = 96
    n_heldout: int = 30
    sft_steps: int = 600
    sft_lr: float = 3e-3
    sft_long_prompt_fraction: float = 0.05
    dpo_steps: int = 40
    dpo_lr: float = 1e-4
    beta: float = 0.1
    dpo_sft_weight: float = 1.0
    dpo_sft_normaliser: float = 1024.0
    dpo_lora_r: int = 0
    dpo_reference: str = "auto"
    lowres_size: int = 8
    ches_drop_fraction: float = 0.3
    square_min: int = 10
    square_max: int = 16
    batch_size: int = 8
    max_new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_sft", "n_stic", "n_heldout", "sft_steps", "dpo_steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dpo_lora_r < 0 or self.dpo_sft_weight < 0 or self.dpo_sft_normaliser < 0:
            raise ValueError("ToyConfig: dpo_lora_r, dpo_sft_weight and dpo_sft_normaliser must be >= 0")
        if not 1 <= self.lowres_size < 32:
            raise ValueError(f"ToyConfig.lowres_size must be in [1, 31] (images are 32 px), got {self.lowres_size}")
        if not 1 <= self.square_min <= self.square_max <= 32:
            raise ValueError(f"ToyConfig: need 1 <= square_min <= square_max <= 32, got {self.square_min}, {self.square_max}")
        if not 0.0 <= self.ches_drop_fraction < 1.0:
            raise ValueError(f"ToyConfig.ches_drop_fraction must be in [0, 1), got {self.ches_drop_fraction}")
        if not 0.0 <= self.sft_long_prompt_fraction <= 1.0:
            raise ValueError(f"ToyConfig.sft_long_prompt_fraction must be in [0, 1], got {self.sft_long_prompt_fraction}")


def _sft_dataset(folder: Path, images: list[tuple[Any, str, str]], config: ToyConfig) -> list[Any]:
    from mmalign.pairs import PairWriter, PreferencePair, read_pairs
    from mmalign.prompts import DESCRIBE_PROMPTS, STIC_DESCRIBE_PROMPT

    rng = random.Random(config.seed)
    with PairWriter(folder, durable=False) as writer:
        for i, (image, square, background) in enumerate(images):
            rel = writer.add_media(image, f"img/sft{i:04d}.png")
            long = rng.random() < config.sft_long_prompt_fraction
            prompt = STIC_DESCRIBE_PROMPT if long else rng.choice(DESCRIBE_PROMPTS)
            writer.write(PreferencePair(id=f"sft{i:04d}", prompt=prompt, chosen=describe_square(square, background),
                                        rejected="", chosen_media=[rel], rejected_media=[rel]))
    return read_pairs(folder)


def _heldout(folder: Path, model: Any, processor: Any, config: ToyConfig) -> dict[str, Any]:
    """Held-out images, their corruptions and the SFT model's greedy descriptions; pair lists for scoring."""
    from mmalign.corruptions import corrupt_pil
    from mmalign.pairs import PairWriter, PreferencePair, read_pairs
    from vision.generate import GenerationSettings, generate_responses

    images = square_images(config.n_heldout, config.seed + 2, (config.square_min, config.square_max))
    corrupted = [[corrupt_pil(img, "stic_lowres", size=config.lowres_size), corrupt_pil(img, "stic_color_jitter", seed=config.seed + i)]
                 for i, (img, _, _) in enumerate(images)]
    greedy = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=0.0, batch_size=32)
    flat = [c for cs in corrupted for c in cs]
    descs = [d.strip() for d in generate_responses(model, processor, [EVAL_PROMPT] * len(flat), [[c] for c in flat], greedy)]
    kinds = ("stic_lowres", "stic_color_jitter")
    with PairWriter(folder / "text", durable=False) as text_w, PairWriter(folder / "pair", durable=False) as pair_w:
        for i, (img, square, background) in enumerate(images):
            truth = describe_square(square, background)
            clean_t = text_w.add_media(img, f"img/h{i:03d}.png")
            clean_p = pair_w.add_media(img, f"img/h{i:03d}.png")
            for k, kind in enumerate(kinds):
                y_corrupt = descs[2 * i + k]
                bad = pair_w.add_media(corrupted[i][k], f"img/h{i:03d}-{kind}.png")
                meta = {"corruption": kind, "y_corrupt_is_true": y_corrupt == truth}
                pair_w.write(PreferencePair(id=f"h{i:03d}-{kind}", prompt=EVAL_PROMPT, chosen=truth, rejected=y_corrupt,
                                            chosen_media=[clean_p], rejected_media=[bad], meta=meta))
                if y_corrupt != truth:
                    text_w.write(PreferencePair(id=f"h{i:03d}-{kind}", prompt=EVAL_PROMPT, chosen=truth,
                                                rejected=y_corrupt, chosen_media=[clean_t], rejected_media=[clean_t],
                                                meta=meta))
    text = read_pairs(folder / "text") if (folder / "text" / "pairs.jsonl").is_file() else []
    return {"images": images, "text": text, "pair": read_pairs(folder / "pair"),
            "y_corrupt_is_true": {kind: float(np.mean([descs[2 * i + k] == describe_square(s, b)
                                                       for i, (_, s, b) in enumerate(images)]))
                                  for k, kind in enumerate(kinds)}}


@torch.no_grad()
def _margins(model: Any, processor: Any, pairs: list[Any], root: Path) -> dict[str, float]:
    from vision.adapter import VLMAdapter

    if not pairs:
        return {"n": 0}
    adapter = VLMAdapter(processor, media_root=root)
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), 16):
        out = adapter.logps(model, adapter.collate(pairs[start : start + 16]))
        chosen.append(out.chosen)
        rejected.append(out.rejected)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"n": len(pairs), "margin": float((c - r).mean()), "accuracy": float((c > r).float().mean()),
            "logps_chosen": float(c.mean()), "logps_rejected": float(r.mean())}


def _describe_accuracy(model: Any, processor: Any, images: list[tuple[Any, str, str]], config: ToyConfig) -> float:
    from vision.generate import GenerationSettings, generate_responses

    greedy = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=0.0, batch_size=32)
    out = generate_responses(model, processor, [EVAL_PROMPT] * len(images), [[img] for img, _, _ in images], greedy)
    return float(np.mean([o.strip() == describe_square(s, b) for o, (_, s, b) in zip(out, images, strict=True)]))


def _ches_filter(model: Any, processor: Any, pairs: list[Any], truth: dict[str, str], out: Path,
                 config: ToyConfig) -> tuple[Path, dict[str, Any]]:
    """Drop the ``ches_drop_fraction`` stage-1 pairs with the highest length-normalised CHES (SFT model).

    The kept pairs (and their media) go to ``out/stic_pairs_ches``; returns that folder and a summary.
    """
    from mmalign.diagnostics import filter_by_ches, score_pairs
    from mmalign.pairs import PairWriter, PreferencePair
    from vision.adapter import VLMAdapter

    rows = score_pairs(model, VLMAdapter(processor, media_root=out / "stic_pairs"), pairs, batch_size=8)
    kept, dropped = filter_by_ches(pairs, [r["ches_ln"] for r in rows], config.ches_drop_fraction)
    folder = out / "stic_pairs_ches"
    with PairWriter(folder, durable=False) as writer:
        for pair in kept:
            chosen_paths, rejected_paths = pair.media_paths()
            chosen_media = [writer.add_media(p, rel, overwrite=True)
                            for p, rel in zip(chosen_paths, pair.chosen_media, strict=True)]
            rejected_media = [writer.add_media(p, rel, overwrite=True)
                              for p, rel in zip(rejected_paths, pair.rejected_media, strict=True)]
            writer.write(PreferencePair.from_dict({**pair.to_dict(), "chosen_media": chosen_media,
                                                   "rejected_media": rejected_media}))

    def share(group: list[Any], field: str) -> float:
        return float(np.mean([getattr(p, field).strip() == truth[p.id] for p in group])) if group else 0.0

    summary = {"kept": len(kept), "dropped": len(dropped),
               "dropped_ids": [p.id for p in dropped],
               "chosen_is_true": {"kept": share(kept, "chosen"), "dropped": share(dropped, "chosen")},
               "rejected_is_true": {"kept": share(kept, "rejected"), "dropped": share(dropped, "rejected")}}
    return folder, summary


def run_stic_toy(
    config: ToyConfig, *, llava_path: str | Path | None = None, describer: str | Path | None = None
) -> dict[str, Any]:
    """Run the toy end to end (see the module docstring); returns the results (also ``out_dir/results.json``).

    Args:
        llava_path: a tiny LLaVA folder to start from (default: :func:`mmalign.tiny.cached_tiny` ``("llava")``).
        describer: a folder with an SFT model saved by an earlier run (``<out_dir>/describer``); the SFT
            step is skipped and the STIC part runs on it (e.g. to try other DPO settings).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.engine import TrainConfig, evaluate, train
    from mmalign.pairs import read_pairs
    from mmalign.tiny import cached_tiny
    from vision.adapter import VLMAdapter
    from vision.stic import STICConfig, build_stic_pairs, train_stic_dpo

    out = Path(config.out_dir)
    if describer is not None and Path(describer).resolve().is_relative_to(out.resolve()):
        raise ValueError(f"describer {str(describer)!r} lies inside out_dir {str(out)!r}, which is cleared first")
    shutil.rmtree(out, ignore_errors=True)
    path = Path(describer or llava_path or cached_tiny("llava"))
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, use_safetensors=True)
    results: dict[str, Any] = {"config": asdict(config), "seconds": {}, "describer": str(describer or "")}
    common = {"batch_size": config.batch_size, "trackers": [], "progress": False, "plot": False, "seed": config.seed,
              "max_grad_norm": 1.0}

    if describer is None:
        t0 = time.perf_counter()
        sft_pairs = _sft_dataset(out / "sft", square_images(config.n_sft, config.seed, (config.square_min, config.square_max)), config)
        sft_cfg = TrainConfig(output_dir=str(out / "sft_run"), loss="sft", learning_rate=config.sft_lr,
                              max_steps=config.sft_steps, lr_scheduler="cosine", warmup_steps=10, **common)
        sft_result = train(model, VLMAdapter(processor, media_root=out / "sft"), sft_pairs, sft_cfg)
        model = sft_result.model.eval()
        model.save_pretrained(out / "describer")
        processor.save_pretrained(out / "describer")
        results["seconds"]["sft"] = time.perf_counter() - t0
        results["sft_final_loss"] = sft_result.metrics[-1]["loss"]
    sft_model = copy.deepcopy(model).eval()

    t0 = time.perf_counter()
    stic_dir = out / "stic_images"
    stic_dir.mkdir(parents=True)
    stic_truth = {}
    for i, (img, square, background) in enumerate(square_images(config.n_stic, config.seed + 1, (config.square_min, config.square_max))):
        img.save(stic_dir / f"s{i:04d}.png")
        stic_truth[f"stic/s{i:04d}.png"] = describe_square(square, background)
    report = build_stic_pairs(model, processor, STICConfig(
        image_dir=str(stic_dir), out_dir=str(out / "stic_pairs"), max_new_tokens=config.max_new_tokens,
        temperature=0.2, batch_size=16, seed=config.seed, lowres_size=config.lowres_size), rank=0, world_size=1)
    stic_pairs = read_pairs(out / "stic_pairs")
    results["seconds"]["stage1"] = time.perf_counter() - t0
    branches = [p.meta["stic"]["corruption"]["name"] if p.meta["stic"]["corruption"] else "hallucination"
                for p in stic_pairs]
    results["stage1"] = {
        "pairs": len(stic_pairs), "skipped": {k: len(v) for k, v in report.skipped.items()},
        "branches": {b: branches.count(b) for b in sorted(set(branches))},
        "chosen_is_true": float(np.mean([p.chosen.strip() == stic_truth[p.id] for p in stic_pairs])) if stic_pairs else 0.0,
        "rejected_is_true": float(np.mean([p.rejected.strip() == stic_truth[p.id] for p in stic_pairs])) if stic_pairs else 0.0,
    }

    held = _heldout(out / "heldout", sft_model, processor, config)
    before = {"text": _margins(sft_model, processor, held["text"], out / "heldout" / "text"),
              "pair": _margins(sft_model, processor, held["pair"], out / "heldout" / "pair"),
              "describe_accuracy": _describe_accuracy(sft_model, processor, held["images"], config)}

    t0 = time.perf_counter()
    dpo_cfg = TrainConfig(output_dir=str(out / "dpo_run"), loss="dpo", loss_kwargs={"beta": config.beta},
                          sft_weight=config.dpo_sft_weight, sft_normaliser=config.dpo_sft_normaliser,
                          lora_r=config.dpo_lora_r, reference=config.dpo_reference, lora_alpha=float(2 * config.dpo_lora_r),
                          learning_rate=config.dpo_lr, max_steps=config.dpo_steps, **common)
    pairs_dir = out / "stic_pairs"
    if config.ches_drop_fraction > 0:
        pairs_dir, results["ches_filter"] = _ches_filter(model, processor, stic_pairs, stic_truth, out, config)
    dpo_result = train_stic_dpo(model, processor, pairs_dir, dpo_cfg)
    policy = dpo_result.model.eval()
    results["seconds"]["dpo"] = time.perf_counter() - t0
    results["dpo_train"] = {k: dpo_result.metrics[-1][k] for k in ("loss", "rewards/margins", "rewards/accuracies")}

    after = {"text": _margins(policy, processor, held["text"], out / "heldout" / "text"),
             "pair": _margins(policy, processor, held["pair"], out / "heldout" / "pair"),
             "describe_accuracy": _describe_accuracy(policy, processor, held["images"], config)}
    implicit = evaluate(policy, VLMAdapter(processor, media_root=out / "heldout" / "pair"), held["pair"],
                        ref_model=sft_model, config=TrainConfig(loss="dpo", loss_kwargs={"beta": config.beta}, trackers=[]))
    results["heldout"] = {"before": before, "after": after, "y_corrupt_is_true": held["y_corrupt_is_true"],
                          "implicit_reward_margin": implicit["rewards/margins"],
                          "implicit_reward_accuracy": implicit["rewards/accuracies"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
