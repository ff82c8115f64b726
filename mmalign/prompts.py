"""Prompt sets for building preference pairs (our own wording; same intent as the papers).

* STIC: a step-by-step describe prompt for the preferred description (:data:`STIC_DESCRIBE_PROMPT`),
  eight "hallucination" prompts for dispreferred descriptions of the clean image
  (:data:`STIC_HALLUCINATION_PROMPTS`), plain describe prompts for dispreferred descriptions of a
  corrupted image (:data:`DESCRIBE_PROMPTS`), and the description-infused template of stage 2
  (:func:`description_infused`).
* POVID: an instruction asking a local language model to rewrite a correct answer with plausible
  hallucinations (:func:`hallucination_injection_prompt`).
* SCL (self-correction learning; He et al. 2024, "Self-Correction is More than Refinement: A Learning
  Framework for Language and Visual Reasoning Tasks", arXiv 2410.04055): four prompts asking the
  model to review its previous answer (:data:`SELF_CORRECTION_REVIEW_PROMPTS`), and, as in the
  official data construction (ivy3h/SCL @b3f15e1 ``SCL/data_construction.py``), a request for
  step-by-step reasoning and an answer-format suffix after both the question and the review prompt
  (:func:`scl_question`, :func:`self_correction_review_prompt`, :func:`self_correction_messages`).
* PhysDPO meta-information hacking: misleading video titles that assert a physically wrong event
  (:func:`misleading_title`, :func:`with_title`).

Randomness: every helper that chooses takes ``rng``, either a ``random.Random`` (advanced in place)
or an ``int`` seed (a fresh ``random.Random(seed)``); Python's global RNG is never used.
"""

from __future__ import annotations

import random
from typing import NamedTuple

__all__ = [
    "DESCRIBE_PROMPTS",
    "MISLEADING_TITLE_TEMPLATES",
    "PHYSICS_VIOLATIONS",
    "POVID_INJECTION_TEMPLATE",
    "PROMPT_SETS",
    "SCL_ANSWER_FORMAT",
    "SCL_STEP_BY_STEP",
    "SELF_CORRECTION_REVIEW_PROMPTS",
    "STIC_DESCRIBE_PROMPT",
    "STIC_DESCRIPTION_INFUSED_TEMPLATE",
    "STIC_HALLUCINATION_PROMPTS",
    "SticNegative",
    "VIDEO_TITLE_TEMPLATE",
    "description_infused",
    "hallucination_injection_prompt",
    "misleading_title",
    "sample_prompt",
    "scl_question",
    "self_correction_messages",
    "self_correction_review_prompt",
    "stic_negative_plan",
    "with_title",
]

# ------------------------------------------------------------------------------------------ STIC

STIC_DESCRIBE_PROMPT: str = (
    "Describe this image in detail. Work through it step by step:\n"
    "1. Subjects and actions: who or what is in the image, and what are they doing?\n"
    "2. Setting: where does the scene take place, and what does the surrounding environment look like?\n"
    "3. Mood: what feeling or atmosphere does the image convey?\n"
    "4. Colours and composition: which colours stand out, and how are the elements arranged in the frame?\n"
    "5. Symbols: is there any text, sign, symbol or object that carries a particular meaning?\n"
    "6. Interpretation: taking all of this together, what is the image about, or what story does it tell?"
)
"""Prompt for the preferred (chosen) description of the clean image, STIC stage 1."""

STIC_HALLUCINATION_PROMPTS: tuple[str, ...] = (
    "Describe the image, and add some imaginative objects that could plausibly be somewhere in the scene.",
    "Picture what lies just beyond the edges of the photo and describe those everyday objects and "
    "activities as if they were part of the image.",
    "Describe the scene, and include a few extra people or animals that might well be close by.",
    "Describe what most likely happened just before and just after this picture was taken, as if it "
    "were all visible in the image.",
    "Describe the image, inventing the words on any labels, signs, screens or packaging that could be in it.",
    "Describe the image, including the objects that are probably hidden behind or inside the things you "
    "can see.",
    "Describe a richer version of this scene, with the extra furniture, decorations or equipment that "
    "would suit the setting.",
    "Describe the image and state the brand, the name and the exact number of everything in it, guessing "
    "wherever the details cannot be seen.",
)
"""Eight prompts that invite hallucinated content: dispreferred descriptions of the clean image."""

DESCRIBE_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Give a detailed description of this image.",
    "Describe what you see in the image.",
    "Write a short paragraph describing this photo.",
    "Explain what is shown in the image.",
    "What does this image show? Describe it in detail.",
    "Provide a description of the scene in this image.",
)
"""Plain describe prompts: used on a corrupted image for STIC's other kind of dispreferred description."""

STIC_DESCRIPTION_INFUSED_TEMPLATE: str = "Image description:\n{desc}\n\n{instruction}"
"""STIC stage 2: the model's own description prepended to an instruction."""


class SticNegative(NamedTuple):
    """How to make one STIC dispreferred description: which prompt, on which image.

    ``corruption`` is ``None`` for the clean image, else a name in ``mmalign.corruptions.CORRUPTIONS``.
    """

    prompt: str
    corruption: str | None


# ----------------------------------------------------------------------------------------- POVID

POVID_INJECTION_TEMPLATE: str = (
    "You are helping to build training data that teaches vision-language models not to hallucinate.\n"
    "Below is a question about an image and a correct answer to it. Rewrite the answer so that it reads "
    "just as fluently and confidently, but contains a few plausible hallucinations of the kinds a model "
    "makes when it does not look carefully:\n"
    "1. Co-occurrence: mention objects that often appear together with the ones in the answer but are not "
    "in it (for example, a fork next to a plate, or a bench in a park).\n"
    "2. Attributes: change the colour, number, size, material or state of some of the objects.\n"
    "3. Relations: change where objects are relative to each other, or what they are doing to each "
    "other.\n"
    "Keep the length, structure and tone close to the original and change only a few details. Do not "
    "mark, list or explain the changes. Reply with the rewritten answer only.\n\n"
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Rewritten answer:"
)
"""Instruction for a local LM to inject co-occurrence, attribute and relation hallucinations."""

# ------------------------------------------------------------------------------------------- SCL

SELF_CORRECTION_REVIEW_PROMPTS: tuple[str, ...] = (
    "Review your previous answer and find the problems in it. Based on the problems you found, give an "
    "improved answer.",
    "Review your previous answer and check that every relevant part of the image was taken into account. "
    "Did you miss any element or detail? Based on your review, give an improved answer.",
    "Review how you understood the image as a whole. Did you read the overall context and the purpose of "
    "the scene correctly? Based on your review, give an improved answer.",
    "Review your answer and make sure your understanding of the image is complete and detailed. Is any part "
    "of the scene left out or misread? Based on your review, give an improved answer.",
)
"""Second-turn prompts asking the model to critique and correct its first answer (SCL's four review
intents: problems in the answer, missed details, overall context, completeness). Used through
:func:`self_correction_review_prompt`, which appends :data:`SCL_STEP_BY_STEP` and the answer format."""

SCL_STEP_BY_STEP: str = "Explain your reasoning step by step."
"""Appended to the question and to the review prompt (SCL asks for step-by-step reasoning in both turns)."""

SCL_ANSWER_FORMAT: str = (
    "Put your final answer between two ##, like ## {example} ## (if your final answer is {example}), at the "
    "end of your response."
)
"""Answer-format suffix of both turns; ``{example}`` is an answer of the task's kind (``A`` for lettered
options, ``0`` for numbered ones, as SCL's ScienceQA). The answer is read back by
:func:`vision.scl.extract_answer`."""

# ------------------------------------------------------------------------------------- PhysDPO

VIDEO_TITLE_TEMPLATE: str = 'The title of this video is "{title}".\n{question}'
"""How a (possibly misleading) title is shown to a video LLM together with the question."""

PHYSICS_VIOLATIONS: tuple[str, ...] = (
    "everything falls upwards",
    "gravity switches off halfway through",
    "the objects pass straight through each other without touching",
    "the water flows uphill on its own",
    "the shadows move towards the light",
    "a head-on crash leaves both objects unscathed and at full speed",
    "the ball speeds up with nothing pushing it",
    "the glass shatters and then reassembles itself",
    "the smoke sinks and pools on the floor like water",
    "the heavy object floats while the light one sinks",
    "the spinning wheel keeps accelerating forever",
    "the reflection in the mirror moves before the person does",
)
"""Physically wrong events for misleading titles."""

MISLEADING_TITLE_TEMPLATES: tuple[str, ...] = (
    "{title}: the moment {event}",
    "Caught on camera: {event} ({title})",
    "{title}, and watch closely as {event}",
    'Unbelievable but real: {event} in "{title}"',
    "Physics-defying footage: {title}, where {event}",
    "Proof that {event}: {title}",
)
"""Templates with ``{title}`` (the true title or caption) and ``{event}`` (a physics violation)."""

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "stic_describe": (STIC_DESCRIBE_PROMPT,),
    "stic_hallucination": STIC_HALLUCINATION_PROMPTS,
    "describe": DESCRIBE_PROMPTS,
    "self_correction": SELF_CORRECTION_REVIEW_PROMPTS,
    "misleading_title": MISLEADING_TITLE_TEMPLATES,
    "physics_violation": PHYSICS_VIOLATIONS,
}
"""Kind -> prompts, for :func:`sample_prompt`."""


# --------------------------------------------------------------------------------------- helpers


def _as_rng(rng: random.Random | int) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")


def sample_prompt(kind: str, rng: random.Random | int) -> str:
    """One prompt of ``kind`` (a key of :data:`PROMPT_SETS`), chosen uniformly with ``rng``.

    Deterministic: the same seed (or a ``random.Random`` in the same state) gives the same prompt.

    Raises:
        KeyError: unknown ``kind`` (the message lists the known ones).
    """
    try:
        prompts = PROMPT_SETS[kind]
    except KeyError:
        raise KeyError(f"unknown prompt kind {kind!r}; known: {', '.join(sorted(PROMPT_SETS))}") from None
    return _as_rng(rng).choice(prompts)


def stic_negative_plan(rng: random.Random | int) -> SticNegative:
    """Choose how to make one STIC dispreferred description, with STIC's 50/50 splits.

    Half the time a hallucination prompt on the clean image (``corruption=None``); otherwise a plain
    describe prompt on a corrupted image, the corruption ``"stic_lowres"`` or
    ``"stic_color_jitter"`` with equal chance. Three draws at most from ``rng``.
    """
    r = _as_rng(rng)
    if r.random() < 0.5:
        return SticNegative(r.choice(STIC_HALLUCINATION_PROMPTS), None)
    corruption = "stic_lowres" if r.random() < 0.5 else "stic_color_jitter"
    return SticNegative(r.choice(DESCRIBE_PROMPTS), corruption)


def description_infused(desc: str, instruction: str) -> str:
    """STIC stage 2 prompt: ``"Image description:\\n{desc}\\n\\n{instruction}"`` (both stripped).

    Braces in ``desc``/``instruction`` are kept literally.
    """
    desc, instruction = desc.strip(), instruction.strip()
    if not desc:
        raise ValueError("description_infused: desc is empty")
    if not instruction:
        raise ValueError("description_infused: instruction is empty")
    return STIC_DESCRIPTION_INFUSED_TEMPLATE.format(desc=desc, instruction=instruction)


def hallucination_injection_prompt(answer: str, question: str | None = None) -> str:
    """POVID: the instruction asking a local LM to rewrite ``answer`` with injected hallucinations.

    ``question`` is the question the answer responds to; ``None`` writes ``(not given)``.
    """
    answer = answer.strip()
    if not answer:
        raise ValueError("hallucination_injection_prompt: answer is empty")
    question = (question or "").strip() or "(not given)"
    return POVID_INJECTION_TEMPLATE.format(question=question, answer=answer)


def misleading_title(true_title: str, rng: random.Random | int) -> str:
    """PhysDPO meta-information hacking: a title that asserts a physically wrong event.

    A template of :data:`MISLEADING_TITLE_TEMPLATES` is filled with ``true_title`` (a video's real
    title or caption; stripped, trailing ``.``/``!`` removed) and an event of
    :data:`PHYSICS_VIOLATIONS`, both chosen with ``rng`` (template first). The answer a video LLM
    gives when shown this title (see :func:`with_title`) is the dispreferred response.
    """
    title = true_title.strip().rstrip(".!").strip()
    if not title:
        raise ValueError("misleading_title: true_title is empty")
    r = _as_rng(rng)
    template = r.choice(MISLEADING_TITLE_TEMPLATES)
    event = r.choice(PHYSICS_VIOLATIONS)
    return template.format(title=title, event=event)


def with_title(question: str, title: str) -> str:
    """A video question preceded by its title: ``'The title of this video is "{title}".\\n{question}'``."""
    return VIDEO_TITLE_TEMPLATE.format(title=title.strip(), question=question.strip())


def _scl_suffix(answer_example: str) -> str:
    example = str(answer_example).strip()
    if not example or "#" in example:
        raise ValueError(f"answer_example must be a short answer without '#', got {answer_example!r}")
    return f"{SCL_STEP_BY_STEP} {SCL_ANSWER_FORMAT.format(example=example)}"


def scl_question(question: str, *, answer_example: str = "A") -> str:
    """SCL first turn: ``"{question} Explain your reasoning step by step. Put your final answer between
    two ##, like ## A ## ..."`` (the question already holds its options, if any)."""
    question = question.strip()
    if not question:
        raise ValueError("scl_question: question is empty")
    return f"{question} {_scl_suffix(answer_example)}"


def self_correction_review_prompt(rng: random.Random | int, *, answer_example: str = "A") -> str:
    """SCL second turn: one of :data:`SELF_CORRECTION_REVIEW_PROMPTS` (chosen with ``rng``), then the
    step-by-step request and the answer-format suffix."""
    return f"{sample_prompt('self_correction', rng)} {_scl_suffix(answer_example)}"


def self_correction_messages(
    question: str, answer: str, rng: random.Random | int, *, answer_example: str = "A"
) -> list[dict[str, str]]:
    """SCL second turn, as chat messages: user question, assistant answer, user review prompt.

    Returns ``[{"role": "user", "content": scl_question(question)}, {"role": "assistant", "content":
    answer}, {"role": "user", "content": self_correction_review_prompt(rng)}]`` (text only; the caller
    adds image entries in its processor's chat format). ``question`` is the bare question (with its
    options); the reasoning request and the answer format are added here, to both user turns.
    """
    return [
        {"role": "user", "content": scl_question(question, answer_example=answer_example)},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": self_correction_review_prompt(rng, answer_example=answer_example)},
    ]
