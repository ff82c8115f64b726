"""POVID: hallucination-injected text negatives and diffusion-noise image negatives (Zhou et al. 2024).

Two pair sets over the same (image, question, answer) records, written into one dataset:

* **text** (``id = "<record id>/text"``): chosen = the ground-truth answer, rejected = the answer
  rewritten by a local language model (any causal LM, or a VLM used text-only; a parameter, no web
  API) with :func:`mmalign.prompts.hallucination_injection_prompt`;
* **image** (``id = "<record id>/image"``): chosen = the ground-truth answer, rejected = the
  policy's own answer to the question on the noised image (``mmalign.corruptions.povid_noise``,
  t = 500). The noisy image is saved in the dataset; by default both sides are scored on the clean
  image (``rejected_on_noisy=False``: a DPO pair needs one prompt); ``True`` scores the rejected
  side on the noisy image.

Combined objective. POVID optimises ``0.5 * DPO(chosen, noisy-image answer) + 0.5 * DPO(chosen,
hallucinated text)`` per record. The engine multiplies each pair's loss by ``batch["weight"]``
(from ``pair.meta["weight"]``) and averages over pairs, so every pair gets
``weight = 2 * w_kind``: over a dataset holding both pairs of every record, the mean is
``(1/2N) * sum_r 2 * (w_text * l_text + w_image * l_image) = w_text * mean(l_text) + w_image * mean(l_image)``,
POVID's objective exactly for the default ``w_text = w_image = 0.5``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.prompts import hallucination_injection_prompt
from vision.generate import GenerationSettings, generate_responses, generate_text

__all__ = ["POVIDRecord", "POVIDReport", "build_povid_pairs", "inject_hallucinations"]


@dataclass
class POVIDRecord:
    """One supervised example: an image (path or PIL), a question and its correct answer."""

    id: str
    image: Any
    question: str
    answer: str


@dataclass
class POVIDReport:
    written: dict[str, int] = field(default_factory=lambda: {"text": 0, "image": 0})
    skipped: dict[str, list[str]] = field(default_factory=dict)


def inject_hallucinations(
    rewriter: torch.nn.Module,
    tokenizer: Any,
    answers: Sequence[str],
    questions: Sequence[str | None] | None = None,
    settings: GenerationSettings | None = None,
) -> list[str]:
    """Rewrite each answer with plausible hallucinations using a local LM (``rewriter``); stripped texts."""
    questions = list(questions) if questions is not None else [None] * len(answers)
    prompts = [hallucination_injection_prompt(a, q) for a, q in zip(answers, questions, strict=True)]
    return [t.strip() for t in generate_text(rewriter, tokenizer, prompts, settings)]


def build_povid_pairs(
    policy: torch.nn.Module,
    processor: Any,
    records: Sequence[POVIDRecord],
    out_dir: str | Path,
    *,
    rewriter: torch.nn.Module | None = None,
    rewriter_tokenizer: Any = None,
    text_weight: float = 0.5,
    image_weight: float = 0.5,
    noise_step: int = 500,
    rejected_on_noisy: bool = False,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> POVIDReport:
    """Write POVID's two pair sets for ``records`` into ``out_dir`` (see the module docstring).

    ``rewriter=None`` uses the policy itself (text only, through ``processor``) to inject
    hallucinations. ``text_weight``/``image_weight``: weights of the two DPO terms (0 drops that set).
    """
    from mmalign.corruptions import describe, pil_to_tensor, povid_noise, tensor_to_pil
    from mmalign.pairs import PairWriter, PreferencePair, load_image

    if text_weight < 0 or image_weight < 0 or text_weight + image_weight == 0:
        raise ValueError(f"POVID weights must be >= 0 and not both 0, got {text_weight}, {image_weight}")
    settings = settings or GenerationSettings(max_new_tokens=128, temperature=0.0)
    report = POVIDReport()
    images = []
    for rec in records:
        images.append(rec.image if not isinstance(rec.image, (str, Path)) else load_image(rec.image))
    hallucinated: list[str] = []
    if text_weight > 0:
        model = rewriter if rewriter is not None else policy
        tok = rewriter_tokenizer if rewriter is not None else processor
        if tok is None:
            raise ValueError("build_povid_pairs: pass rewriter_tokenizer with rewriter")
        hallucinated = inject_hallucinations(model, tok, [r.answer for r in records], [r.question for r in records],
                                             settings)
    noisy: list[Any] = []
    noisy_answers: list[str] = []
    if image_weight > 0:
        for i, img in enumerate(images):
            generator = torch.Generator().manual_seed(seed + i)
            noisy.append(tensor_to_pil(povid_noise(pil_to_tensor(img), t=noise_step, generator=generator)))
        noisy_answers = generate_fn(policy, processor, [r.question for r in records], [[n] for n in noisy], settings)
    with PairWriter(out_dir) as writer:
        for i, rec in enumerate(records):
            clean_rel = writer.add_media(images[i].convert("RGB"), f"media/{rec.id}.png", overwrite=True)
            kinds = []
            if text_weight > 0:
                kinds.append(("text", hallucinated[i], [clean_rel], {}, text_weight))
            if image_weight > 0:
                noisy_rel = writer.add_media(noisy[i], f"media/{rec.id}-povid_noise.png", overwrite=True)
                corruption = describe("povid_noise", seed=seed + i, t=noise_step)
                rejected_media = [noisy_rel] if rejected_on_noisy else [clean_rel]
                kinds.append(("image", noisy_answers[i].strip(), rejected_media,
                              {"noisy_image": noisy_rel, "corruption": corruption}, image_weight))
            for kind, rejected, rejected_media, extra, weight in kinds:
                if not rejected or rejected == rec.answer.strip():
                    report.skipped.setdefault(f"{kind}: empty or identical negative", []).append(rec.id)
                    continue
                writer.write(PreferencePair(
                    id=f"{rec.id}/{kind}", prompt=rec.question, chosen=rec.answer, rejected=rejected,
                    chosen_media=[clean_rel], rejected_media=rejected_media,
                    meta={"weight": 2.0 * weight, "povid": {"kind": kind, **extra}},
                ))
                report.written[kind] += 1
    return report
