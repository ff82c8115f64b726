"""SCL: self-correction learning pairs from two-turn answers.

He et al. 2024, "Self-Correction is More than Refinement: A Learning Framework for Language and
Visual Reasoning Tasks" (arXiv 2410.04055); official code ivy3h/SCL @b3f15e1
(``SCL/data_construction.py``).

Turn 1: the policy answers the question on the image, asked to reason step by step and to end with
its answer in a fixed format (:func:`mmalign.prompts.scl_question`: ``... ## A ##``). Turn 2: shown its
own answer and a review prompt (:func:`mmalign.prompts.self_correction_review_prompt`: one of four
review intents, the same step-by-step request and answer format), it answers again. Both turns get
256 new tokens (SCL sets ``generation_config.max_new_tokens = 256``), greedy by default. A ``checker``
(``checker(record, answer) -> bool``; :func:`extract_answer` reads the ``## X ##`` answer) says which
answers are correct; a pair is kept only when correctness flips between the turns, the correct turn
is chosen and the other rejected, both as answers to the first-turn prompt on the same image.
Records where both or neither turn is correct are counted, not written. (SCL stores the bare
question as the pair's prompt; we store the first-turn prompt the answers were written for, whose
format instruction their final ``## X ##`` follows.)

Training: DPO (beta 0.1) plus an SFT term on the chosen answer weighted 0.1, LoRA, lr 5e-5, 3 epochs
(SCL README, ms-swift ``rlhf --rlhf_type dpo --beta 0.1 --sft_beta 0.1``): the YAML
``scripts/configs/llava15_scl.yaml`` for ``scripts/train_vlm.py``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.prompts import self_correction_messages
from vision.generate import GenerationSettings, generate_responses

__all__ = ["SCLRecord", "SCLReport", "build_scl_pairs", "extract_answer", "review_conversation"]

# "## A ##" first, then any "## ... ##", then a bare option letter followed by a full stop ("B.")
_ANSWER_PATTERNS = (re.compile(r"##\s*([A-Z0-9])\s*##"), re.compile(r"##(.*?)##"), re.compile(r"\b([A-D])\."))


def extract_answer(text: str) -> str | None:
    """The final answer of an SCL-formatted response: the text between ``##`` marks (``## A ##`` -> ``"A"``),
    else an option letter followed by a full stop; ``None`` when there is neither."""
    for pattern in _ANSWER_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).strip()
    return None


@dataclass
class SCLRecord:
    id: str
    image: Any
    question: str  # with its options, if any
    reference: Any = None  # whatever the checker needs (e.g. the correct option)


@dataclass
class SCLReport:
    written: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"improved": 0, "worsened": 0, "both": 0, "neither": 0})


def review_conversation(
    question: str, answer: str, rng: random.Random | int, *, answer_example: str = "A"
) -> list[dict[str, Any]]:
    """The second-turn chat: user (image + question), assistant (first answer), user (review prompt)."""
    msgs = self_correction_messages(question, answer, rng, answer_example=answer_example)
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": msgs[0]["content"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": msgs[1]["content"]}]},
        {"role": "user", "content": [{"type": "text", "text": msgs[2]["content"]}]},
    ]


def build_scl_pairs(
    policy: torch.nn.Module,
    processor: Any,
    records: Sequence[SCLRecord],
    checker: Callable[[SCLRecord, str], bool],
    out_dir: str | Path,
    *,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    answer_example: str = "A",
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> SCLReport:
    """Generate both turns in batches, check them, and write the flipped ones as pairs to ``out_dir``.

    ``settings`` default: greedy, 256 new tokens (SCL). ``answer_example``: the example answer in the
    format suffix (``"A"`` for lettered options, ``"0"`` for numbered ones).
    """
    from mmalign.pairs import PairWriter, PreferencePair, load_image
    from mmalign.prompts import scl_question

    settings = settings or GenerationSettings(max_new_tokens=256, temperature=0.0)
    images = [r.image if not isinstance(r.image, (str, Path)) else load_image(r.image) for r in records]
    prompts = [scl_question(r.question, answer_example=answer_example) for r in records]
    first = generate_fn(policy, processor, prompts, [[im] for im in images], settings)
    convs = [review_conversation(r.question, a, random.Random(f"{seed}:{r.id}"), answer_example=answer_example)
             for r, a in zip(records, first, strict=True)]
    second = generate_fn(policy, processor, convs, [[im] for im in images], settings)
    report = SCLReport()
    with PairWriter(out_dir) as writer:
        for rec, img, prompt, conv, a1, a2 in zip(records, images, prompts, convs, first, second, strict=True):
            ok1, ok2 = bool(checker(rec, a1)), bool(checker(rec, a2))
            kind = {(False, True): "improved", (True, False): "worsened", (True, True): "both"}.get(
                (ok1, ok2), "neither")
            report.counts[kind] += 1
            if ok1 == ok2:
                continue
            chosen, rejected = (a2, a1) if ok2 else (a1, a2)
            rel = writer.add_media(img.convert("RGB"), f"media/{rec.id}.png", overwrite=True)
            writer.write(PreferencePair(
                id=f"scl/{rec.id}", prompt=prompt, chosen=chosen, rejected=rejected,
                chosen_media=[rel], rejected_media=[rel],
                meta={"scl": {"kind": kind, "question": rec.question, "turn1": a1, "turn2": a2,
                              "review_prompt": conv[2]["content"][0]["text"]}},
            ))
            report.written += 1
    return report
