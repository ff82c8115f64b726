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

Generating the pairs (:func:`build_scl_pairs`, :class:`SCLPairsConfig`; from the command line
:func:`scl_pairs_command`, e.g. ``--model llava-hf/llava-1.5-7b-hf --scl.records data/mcq.jsonl
--scl.out_dir data/scl_pairs``). Input: a records file, JSONL ``{"id", "image", "question", "answer"}``
per line (or LLaVA instruction JSON, first human/gpt turn; :mod:`vision.records`), where ``question``
holds its options (``"What colour is the cube? A. red B. blue"``) and ``answer`` is the gold answer
(``"A"``). The default checker (:func:`answer_is_correct`) compares the response's ``## X ##`` answer
with it, ignoring case and surrounding spaces (SCL: ``extract_answer(res) == str(item['answer'])``).
Bad records are skipped and counted, each named by file, line and field. Records go in batches of
``batch_size``: turn 1 for the batch, then turn 2; each turn is sampled with its own seed
``(seed, id, "turn1"/"turn2")`` and the review prompt is chosen with ``(seed, id)`` (SCL fixes one of
the four per run, ``--prompt``; we draw one per record), so the pairs do not depend on batching,
sharding or resumption. Sharded and resumable through :mod:`mmalign.sharding`:
record ``i`` belongs to rank ``i % world_size``; records that did not flip are logged in the shard's
outcome log, so a re-run generates neither them nor the written pairs again; rank 0 merges the
shards into ``out_dir/pairs.jsonl``.

Training: DPO (beta 0.1) plus an SFT term on the chosen answer weighted 0.1, LoRA, lr 5e-5, 3 epochs
(SCL README, ms-swift ``rlhf --rlhf_type dpo --beta 0.1 --sft_beta 0.1``): the YAML
``scripts/configs/llava15_scl.yaml`` for ``scripts/train_vlm.py``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.config import help_
from mmalign.prompts import self_correction_messages
from mmalign.sharding import ShardedRun, ShardReport
from vision.generate import GenerationSettings, generate_responses, record_seed
from vision.records import ImageQA, load_records, open_record_image, run_pairs_job, store_record_image

__all__ = [
    "SCLPairsConfig",
    "SCLPairsJob",
    "answer_is_correct",
    "build_scl_pairs",
    "extract_answer",
    "review_conversation",
    "scl_pairs_command",
]

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


def answer_is_correct(record: ImageQA, response: str) -> bool:
    """SCL's check: the response's final answer (:func:`extract_answer`) equals the record's gold answer,
    ignoring case and surrounding spaces."""
    found = extract_answer(response)
    return found is not None and found.strip().casefold() == record.answer.strip().casefold()


@dataclass
class SCLPairsConfig:
    """SCL pair generation (every field a CLI flag and a YAML key; the policy is given apart)."""

    records: str = field(default="", metadata=help_(
        "records file: JSONL {id, image, question (with its options), answer (the gold answer, e.g. B)} per line, "
        "or LLaVA JSON [{id, image, conversations}] (first human/gpt turn); image paths relative to the file's "
        "folder or image_root"))
    image_root: str = field(default="", metadata=help_("folder image paths resolve against (default: the records' folder)"))
    out_dir: str = field(default="", metadata=help_("pair dataset folder to create or resume"))
    answer_example: str = field(default="A", metadata=help_(
        "example answer in the format suffix (## A ##): A for lettered options, 0 for numbered ones"))
    batch_size: int = field(default=8, metadata=help_("records per generate() call"))
    max_new_tokens: int = field(default=256, metadata=help_("tokens per turn (SCL: 256)"))
    temperature: float = field(default=0.0, metadata=help_("sampling temperature (0: greedy, as SCL's LLaVA runs)"))
    seed: int = field(default=0, metadata=help_("seed of the review prompts and of sampling (per record)"))
    limit: int | None = field(default=None, metadata=help_("use only the first N records of the file"))
    skip_bad: bool = field(default=True, metadata=help_(
        "skip and count bad records (named by file, line and field); false: stop at the first"))
    system_prompt: str | None = field(default=None, metadata=help_("system message for generation"))
    progress: bool = field(default=True, metadata=help_("progress bar (rank 0)"))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("SCLPairsConfig: batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SCLPairsConfig.temperature must be >= 0, got {self.temperature}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"SCLPairsConfig.limit must be >= 1 or None, got {self.limit}")
        if not self.answer_example.strip():
            raise ValueError("SCLPairsConfig.answer_example must not be empty")


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
    config: SCLPairsConfig,
    *,
    records: Sequence[ImageQA] | None = None,
    checker: Callable[[ImageQA, str], bool] = answer_is_correct,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> ShardReport:
    """Write (or resume) SCL pairs in ``config.out_dir``: both turns in batches, the flips kept.

    Args:
        policy, processor: the VLM and its ``AutoProcessor``.
        config: what to generate; ``config.records`` is read unless ``records`` is given.
        records: in-memory records (``image`` a path or a PIL image) instead of the file.
        checker: ``checker(record, response) -> bool``; default :func:`answer_is_correct`.
        rank, world_size: this process's shard; default :func:`mmalign.distributed.process_state`.
        merge: after every rank finishes, rank 0 merges the shards into ``out_dir/pairs.jsonl``.
        generate_fn: the batched generator (:func:`vision.generate.generate_responses` signature).

    Returns:
        A :class:`mmalign.sharding.ShardReport`; ``counts``: records per outcome of this run
        (``improved``, ``worsened``: written; ``both``, ``neither``: correct in both or neither turn).
    """
    from tqdm.auto import tqdm

    from mmalign.pairs import PairFormatError, PreferencePair
    from mmalign.prompts import scl_question

    if not config.out_dir:
        raise ValueError("SCLPairsConfig.out_dir is required")
    report = ShardReport(out_dir=config.out_dir, counts={"improved": 0, "worsened": 0, "both": 0, "neither": 0})
    run = ShardedRun(config.out_dir, rank=rank, world_size=world_size)
    records = load_records(config, records, report, count_bad=run.rank == 0)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  batch_size=config.batch_size, seed=config.seed)
    todo: list[ImageQA] = []
    for i, rec in enumerate(records):
        if not run.mine(i):
            report.other_ranks += 1
        elif f"scl/{rec.id}" in run.done:
            report.already_done += 1
        else:
            todo.append(rec)

    bar = tqdm(total=len(todo), desc="scl", disable=not config.progress or run.rank != 0)
    with run.writer() as writer:
        for start in range(0, len(todo), config.batch_size):
            items = []
            for rec in todo[start : start + config.batch_size]:
                image = open_record_image(rec, report)
                if image is None:
                    bar.update(1)
                    continue
                items.append((rec, image))
            if not items:
                continue
            images = [[im] for _, im in items]
            prompts = [scl_question(rec.question, answer_example=config.answer_example) for rec, _ in items]
            first = generate_fn(policy, processor, prompts, images, settings, system_prompt=config.system_prompt,
                                seeds=[record_seed(config.seed, rec.id, "turn1") for rec, _ in items])
            convs = [review_conversation(rec.question, a1, random.Random(f"{config.seed}:{rec.id}"),
                                         answer_example=config.answer_example)
                     for (rec, _), a1 in zip(items, first, strict=True)]
            second = generate_fn(policy, processor, convs, images, settings, system_prompt=config.system_prompt,
                                 seeds=[record_seed(config.seed, rec.id, "turn2") for rec, _ in items])
            for (rec, image), prompt, conv, a1, a2 in zip(items, prompts, convs, first, second, strict=True):
                bar.update(1)
                pid = f"scl/{rec.id}"
                ok1, ok2 = bool(checker(rec, a1)), bool(checker(rec, a2))
                kind = {(False, True): "improved", (True, False): "worsened", (True, True): "both"}.get(
                    (ok1, ok2), "neither")
                report.count(kind)
                if ok1 == ok2:
                    run.outcome(pid, f"no flip: {kind}")
                    continue
                chosen, rejected = (a2, a1) if ok2 else (a1, a2)
                rel = store_record_image(writer, rec, image)
                meta = {"scl": {"kind": kind, "record_id": rec.id, "question": rec.question, "answer": rec.answer,
                                "turn1": a1, "turn2": a2, "review_prompt": conv[2]["content"][0]["text"]}}
                try:  # the pair rules (blank text, sides equal up to whitespace) are the core's
                    pair = PreferencePair(id=pid, prompt=prompt, chosen=chosen, rejected=rejected,
                                          chosen_media=[rel], rejected_media=[rel], meta=meta)
                except PairFormatError as exc:
                    run.outcome(pid, f"breaks a pair rule ({exc.field}): {exc.reason}")
                    report.skip(f"generation breaks a pair rule ({exc.field})", f"{pid}: {exc.reason}")
                    continue
                writer.write(pair)
                report.written += 1
            writer.sync()
            run.sync()
    bar.close()
    report.merged = run.finish(merge=merge, order=[f"scl/{rec.id}" for rec in records])
    return report


@dataclass
class SCLPairsJob:
    """SCL pair generation from the command line: the policy plus :class:`SCLPairsConfig`."""

    model: str = field(default="", metadata=help_("policy: folder, hub name or tiny:<family>"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    scl: SCLPairsConfig = field(default_factory=SCLPairsConfig, metadata=help_("pair generation"))


def scl_pairs_command(argv: list[str]) -> int:
    """SCL pairs: two-turn answers (answer, review) for a records file, kept when correctness flips; resumable.

    ``--model M --scl.records R --scl.out_dir O [--scl.<field> V ...] [--config job.yaml]``:
    :func:`build_scl_pairs` with every :class:`SCLPairsConfig` field as a ``--scl.*`` flag. Re-run the
    same command to resume; under ``accelerate launch`` each process writes its own shard and the first
    merges them. Returns 0, or 2 when the model, the records file or the output folder is missing.
    """
    from mmalign.config import load_config

    job = load_config(SCLPairsJob, argv, description=scl_pairs_command.__doc__)
    return run_pairs_job(job, "scl", lambda policy, processor, device: build_scl_pairs(policy, processor, job.scl))
