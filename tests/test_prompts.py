"""Tests for mmalign.prompts: counts, uniqueness, templates, deterministic sampling."""

from __future__ import annotations

import random
import re
import string

import pytest

from mmalign import prompts as P


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().strip())


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def test_counts_and_uniqueness() -> None:
    assert len(P.STIC_HALLUCINATION_PROMPTS) == 8
    assert len(P.DESCRIBE_PROMPTS) >= 5
    assert len(P.SELF_CORRECTION_REVIEW_PROMPTS) >= 3
    assert len(P.MISLEADING_TITLE_TEMPLATES) >= 4
    assert len(P.PHYSICS_VIOLATIONS) >= 8
    everything = [p for kind in P.PROMPT_SETS.values() for p in kind]
    assert len({_norm(p) for p in everything}) == len(everything), "no prompt repeats, even across sets"


def test_plain_prompts_have_no_placeholders() -> None:
    for kind in ("stic_describe", "stic_hallucination", "describe", "self_correction", "physics_violation"):
        for prompt in P.PROMPT_SETS[kind]:
            assert "{" not in prompt and "}" not in prompt, prompt
            assert prompt == prompt.strip() and prompt


def test_stic_describe_prompt_steps_in_order() -> None:
    text = P.STIC_DESCRIBE_PROMPT.lower()
    steps = ["subjects and actions", "setting", "mood", "colours and composition", "symbols", "interpretation"]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    assert [line[:2] for line in P.STIC_DESCRIBE_PROMPT.splitlines()[1:]] == ["1.", "2.", "3.", "4.", "5.", "6."]


def test_hallucination_prompts_invite_invention() -> None:
    cue = re.compile(r"imagin|invent|guess|beyond the edges|might|probably|could|likely|extra|richer")
    for prompt in P.STIC_HALLUCINATION_PROMPTS:
        assert cue.search(prompt.lower()), prompt
        assert prompt.lower().startswith(("describe", "picture")), prompt


def test_description_infused_template_exact() -> None:
    out = P.description_infused("  A cat on a {red} mat.\n", "What colour is the mat?  ")
    assert out == "Image description:\nA cat on a {red} mat.\n\nWhat colour is the mat?"
    assert P.STIC_DESCRIPTION_INFUSED_TEMPLATE == "Image description:\n{desc}\n\n{instruction}"
    with pytest.raises(ValueError, match="desc is empty"):
        P.description_infused("  ", "Q?")


def test_hallucination_injection_prompt_fills_fields() -> None:
    assert _fields(P.POVID_INJECTION_TEMPLATE) == {"question", "answer"}
    text = P.hallucination_injection_prompt("Two dogs play {fetch}.", "What are the dogs doing?")
    assert text.endswith("Question: What are the dogs doing?\nCorrect answer: Two dogs play {fetch}.\nRewritten answer:")
    for kind in ("co-occurrence", "attributes", "relations"):
        assert kind in text.lower()
    assert "Question: (not given)" in P.hallucination_injection_prompt("A red bus.")
    with pytest.raises(ValueError, match="answer is empty"):
        P.hallucination_injection_prompt("")


def test_sampling_is_deterministic_and_covers_sets() -> None:
    for kind, prompts in P.PROMPT_SETS.items():
        assert P.sample_prompt(kind, 123) == P.sample_prompt(kind, 123)
        assert P.sample_prompt(kind, random.Random(5)) == P.sample_prompt(kind, 5)
        seen = {P.sample_prompt(kind, seed) for seed in range(300)}
        assert seen == set(prompts), kind
    rng_a, rng_b = random.Random(9), random.Random(9)
    seq_a = [P.sample_prompt("describe", rng_a) for _ in range(20)]
    seq_b = [P.sample_prompt("describe", rng_b) for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1, "a Random instance advances"


def test_sampling_errors() -> None:
    with pytest.raises(KeyError, match="known: describe, misleading_title"):
        P.sample_prompt("poem", 0)
    with pytest.raises(TypeError, match="random.Random or an int"):
        P.sample_prompt("describe", 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="random.Random or an int"):
        P.sample_prompt("describe", True)


def test_misleading_title() -> None:
    title = P.misleading_title("A boy kicks a football against a wall.", 3)
    assert title == P.misleading_title("A boy kicks a football against a wall.", random.Random(3))
    assert "A boy kicks a football against a wall" in title and "wall." not in title
    assert any(event in title for event in P.PHYSICS_VIOLATIONS)
    assert "{" not in title
    titles = {P.misleading_title("Ice skating", seed) for seed in range(200)}
    assert len(titles) > 30
    for template in P.MISLEADING_TITLE_TEMPLATES:
        assert _fields(template) == {"title", "event"}
    with pytest.raises(ValueError, match="empty"):
        P.misleading_title("  . ", 0)


def test_with_title() -> None:
    assert P.with_title(" What happens to the ball? ", "Ball drop") == (
        'The title of this video is "Ball drop".\nWhat happens to the ball?'
    )


def test_stic_negative_plan_splits() -> None:
    """50/50 clean-hallucination vs corrupted; corrupted splits 50/50 lowres vs colour jitter."""
    plans = [P.stic_negative_plan(seed) for seed in range(2000)]
    clean = [p for p in plans if p.corruption is None]
    assert all(p.prompt in P.STIC_HALLUCINATION_PROMPTS for p in clean)
    corrupted = [p for p in plans if p.corruption is not None]
    assert all(p.prompt in P.DESCRIBE_PROMPTS for p in corrupted)
    assert 900 < len(clean) < 1100
    lowres = sum(p.corruption == "stic_lowres" for p in corrupted)
    assert 0.4 < lowres / len(corrupted) < 0.6
    assert {p.corruption for p in corrupted} == {"stic_lowres", "stic_color_jitter"}
    assert P.stic_negative_plan(7) == P.stic_negative_plan(7)


def test_stic_negative_plan_names_real_corruptions() -> None:
    from mmalign.corruptions import CORRUPTIONS, STIC_IMAGE_CORRUPTIONS

    names = {P.stic_negative_plan(seed).corruption for seed in range(100)} - {None}
    assert names == set(STIC_IMAGE_CORRUPTIONS) and names <= set(CORRUPTIONS)


def test_self_correction_messages() -> None:
    """SCL's structure (ivy3h/SCL @b3f15e1 SCL/data_construction.py): both user turns ask for step-by-step
    reasoning and end with the answer-format suffix; four review intents."""
    messages = P.self_correction_messages("How many cats? A. 1 B. 2", "Three.", 1)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "Three."
    suffix = "Explain your reasoning step by step. Put your final answer between two ##, like ## A ## (if your " \
             "final answer is A), at the end of your response."
    assert messages[0]["content"] == "How many cats? A. 1 B. 2 " + suffix == P.scl_question("How many cats? A. 1 B. 2")
    review, _, tail = messages[2]["content"].partition(" Explain")
    assert review in P.SELF_CORRECTION_REVIEW_PROMPTS and messages[2]["content"].endswith(suffix)
    assert messages == P.self_correction_messages("How many cats? A. 1 B. 2", "Three.", 1)
    assert len(P.SELF_CORRECTION_REVIEW_PROMPTS) == 4
    assert all(p.lower().startswith("review") for p in P.SELF_CORRECTION_REVIEW_PROMPTS)
    assert "## 0 ##" in P.self_correction_review_prompt(2, answer_example="0")
    with pytest.raises(ValueError, match="answer_example"):
        P.scl_question("q", answer_example="#")
