"""SCL: self-correction pairs from two-turn answers.

Turn 1: the policy answers the question on the image. Turn 2: shown its own answer and a review
prompt (:data:`mmalign.prompts.SELF_CORRECTION_REVIEW_PROMPTS`), it answers again. A ``checker``
(``checker(record, answer) -> bool``) says which answers are correct; a pair is kept only when
correctness flips between the turns, the correct turn is chosen and the other rejected (both as
answers to the original question on the same image). Records where both or neither turn is
correct are counted, not written.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.prompts import self_correction_messages
from vision.generate import GenerationSettings, generate_responses

__all__ = ["SCLRecord", "SCLReport", "build_scl_pairs", "review_conversation"]


@dataclass
class SCLRecord:
    id: str
    image: Any
    question: str
    reference: Any = None  # whatever the checker needs (e.g. the correct option)


@dataclass
class SCLReport:
    written: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"improved": 0, "worsened": 0, "both": 0, "neither": 0})


def review_conversation(question: str, answer: str, rng: random.Random | int) -> list[dict[str, Any]]:
    """The second-turn chat: user (image + question), assistant (first answer), user (review prompt)."""
    msgs = self_correction_messages(question, answer, rng)
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
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> SCLReport:
    """Generate both turns in batches, check them, and write the flipped ones as pairs to ``out_dir``."""
    from mmalign.pairs import PairWriter, PreferencePair, load_image

    settings = settings or GenerationSettings(max_new_tokens=128, temperature=0.0)
    images = [r.image if not isinstance(r.image, (str, Path)) else load_image(r.image) for r in records]
    first = generate_fn(policy, processor, [r.question for r in records], [[im] for im in images], settings)
    convs = [review_conversation(r.question, a, random.Random(f"{seed}:{r.id}")) for r, a in zip(records, first,
                                                                                               strict=True)]
    second = generate_fn(policy, processor, convs, [[im] for im in images], settings)
    report = SCLReport()
    with PairWriter(out_dir) as writer:
        for rec, img, conv, a1, a2 in zip(records, images, convs, first, second, strict=True):
            ok1, ok2 = bool(checker(rec, a1)), bool(checker(rec, a2))
            kind = {(False, True): "improved", (True, False): "worsened", (True, True): "both"}.get(
                (ok1, ok2), "neither")
            report.counts[kind] += 1
            if ok1 == ok2:
                continue
            chosen, rejected = (a2, a1) if ok2 else (a1, a2)
            rel = writer.add_media(img.convert("RGB"), f"media/{rec.id}.png", overwrite=True)
            writer.write(PreferencePair(
                id=f"scl/{rec.id}", prompt=rec.question, chosen=chosen, rejected=rejected,
                chosen_media=[rel], rejected_media=[rel],
                meta={"scl": {"kind": kind, "turn1": a1, "turn2": a2,
                              "review_prompt": conv[2]["content"][0]["text"]}},
            ))
            report.written += 1
    return report
