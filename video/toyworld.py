"""A toy video LLM and PhysDPO run on it: toy-world motion clips, nothing downloaded.

The clips (:func:`toy_clips`)
    :func:`mmalign.toyworld.motion_clip`: 8 frames of 32x32, a ball of one of six colours moving left, right,
    up or down, either at constant velocity (physical) or jumping ahead by three steps halfway (unphysical);
    half of each set is of each kind. Three seed streams never overlap: ``"sft"`` (the base model's
    training), ``"physdpo"`` (the method's own clips) and ``"held_out"`` (evaluation only). Clips are written
    as FFV1 ``.mkv`` files (lossless apart from yuv420 chroma) and read back through :mod:`video.frames`.
    Every clip gets the three :data:`QUESTIONS` (smoothness yes/no, direction, colour) with one-word
    answers (:func:`clip_answer`) and a title (:func:`clip_title`, e.g. ``"a red ball moves left smoothly"``).

The base model (:func:`build_toy_video_llm`, shipped in ``toy_models/video``)
    LLaVA-NeXT-Video (the tiny family of :func:`mmalign.tiny.make_tiny_llava_next_video`: its processor,
    tokenizer and config, widened by :class:`ToyVideoConfig` to hidden 64 in the CLIP tower and the Llama
    text model, 2 layers each; patch 4 instead of the family's 8, so 16 video tokens per frame, each an 8x8
    pixel region), from random init, SFT on 384 ``"sft"`` clips: each clip is decoded and tensorised once
    through :class:`video.adapter.VideoLLMAdapter` (pixels; token ids and labels of every question, plain and
    with the clip's true title before it), then a plain AdamW loop (:func:`_sft`): 1400 steps of 4 clips with
    all three questions each (12 rows, one video encoding per clip), each question titled with probability 0.2
    (``with_title``: a real video LLM reads titles, and the title hack needs a model that does), learning rate
    2e-3, warmup then cosine, clipping 1.0, logits only at the labelled positions (305-322 s CPU on one
    thread, on a loaded machine; a rebuild with the defaults gave the same bytes).

The method (:func:`demo_physdpo`; the project's own path)
    :func:`video.physdpo.build_physdpo_pairs` on 48 ``"physdpo"`` clips x 3 questions, with the true answer as
    chosen and, as rejected, the policy's own answer (temperature 0.2, at most 8 new tokens) under each hack:
    another clip's title before the question, 1 frame instead of 8, frames shrunk 16x (2 px) and restored;
    pairs whose hacked answer equals the true one are not written. Then DPO through :func:`video.train.run`
    (the ``train-video`` command's function): beta 0.1, 2 epochs, full fine-tuning, no SFT term, 8 frames, as
    PhysDPO (which uses 16 frames and learning rate 5e-6 on a pretrained 7B model); the toy's rate is 5e-4 (a
    0.25M-parameter model trained from scratch moves far less per step at 5e-6), batch 8.

Metrics (fixed before any run), on 40 ``"held_out"`` clips never seen by SFT or the method
    * ``held-out answer accuracy`` per question and over all three: the greedy answer to the plain question
      on the clean clip names the true value and no other (:func:`answer_correct`), one item per clip and
      question;
    * ``held-out DPO margin``: ``logp(chosen) - logp(rejected)`` (summed response log-probs, clean clip,
      plain question) on held-out PhysDPO pairs that the SFT model wrote for the held-out clips before
      training (fixed texts, the same for both models); DPO's implicit reward margin after training is
      beta times its change.
    Each row's interval is the 95% paired bootstrap of (after - before) (:func:`mmalign.report.paired_bootstrap`).

Measured (``python -c "from pathlib import Path; from video.toyworld import demo_physdpo;
    demo_physdpo(Path('runs/toy_video'), seed=S)"``, seeds 0, 1, 2; 53, 48 and 46 s CPU on one thread; the
    shipped model above; change [95% CI] per seed)
        ====================================  =================  =================  =================
        metric (held-out)                     seed 0             seed 1             seed 2
        ====================================  =================  =================  =================
        answer accuracy, smooth (n 40)        0.500 -> 0.500     0.575 -> 0.500     0.600 -> 0.500
                                              +0.000 [-.25,+.25] -0.075 [-.30,+.18] -0.100 [-.33,+.13]
        answer accuracy, direction (n 40)     0.250 -> 0.250     0.275 -> 0.300     0.275 -> 0.075
                                              +0.000 [-.20,+.23] +0.025 [-.23,+.25] -0.200 [-.38,-.05]
        answer accuracy, colour (n 40)        1.000 -> 0.625     1.000 -> 0.475     1.000 -> 0.475
                                              -0.375 [-.53,-.25] -0.525 [-.68,-.37] -0.525 [-.68,-.38]
        answer accuracy, all (n 120)          0.583 -> 0.458     0.617 -> 0.425     0.625 -> 0.350
                                              -0.125 [-.25,+.00] -0.192 [-.33,-.06] -0.275 [-.38,-.16]
        DPO margin, logp nats                 2.35 -> 10.12      2.58 -> 11.44      2.86 -> 10.19
        (n 181, 196, 183 pairs)               +7.77 [+5.5,+10.2] +8.87 [+6.5,+11.4] +7.34 [+5.2,+9.8]
        ====================================  =================  =================  =================

    PhysDPO pairs written (of 432 hacked answers; the rest equalled the true answer) per seed: 202, 225, 215
    (title 49-58, one-frame 58-67, low-resolution 95-100); 50-56 DPO steps.
    Reading: the base model reads the colour from the clip (held-out 1.000 on each seed, six different
    answers) but not the motion: it answers "left" or "up" to the direction question whatever the clip (chance
    1/4) and "no"/"yes" at chance to the smoothness question. PhysDPO lowered answer accuracy on every seed:
    its rejected colour answers are one value ("green", 41-44 of them, 40-42 from the low-resolution hack:
    what the model says when the ball is a 2-pixel smear; the rest one-frame; the title hack left no colour
    pair, the model answers the clip's colour whatever the title), so DPO learned "not green" rather than
    "read the clip": afterwards green clips were answered "red" (seed 2: "g"), red clips "yellow", and on seed
    1 yellow clips "blue", a chain of shifted answers; on seed 2 white clips got "whit". The smoothness and
    direction answers collapsed to one value each ("yes"; "right" or "down"). The held-out margin rose by 7-9
    nats because the rejected answers were pushed down, not because the chosen ones became the model's
    answers. With the paper's setting scaled to the toy (beta 0.1, 2 epochs, lr 5e-4 for a 0.25M-parameter
    model trained from scratch, against 5e-6 on a pretrained 7B model), PhysDPO does not raise accuracy here;
    the base model gives it no physics signal to sharpen, since it does not read the motion at all. Lower
    rates, seed 0 (same pairs, 50 steps): lr 1e-4 (48 s CPU): smooth 0.500 -> 0.500, direction 0.250 -> 0.200,
    colour 1.000 -> 0.500 (-0.500 [-0.650, -0.350]), all 0.583 -> 0.400 (-0.183 [-0.309, -0.058]), margin
    +4.99 [+3.44, +6.60]; lr 2e-5 (43 s): smooth 0.500 -> 0.450, direction 0.250 -> 0.250, colour 1.000 ->
    1.000, all 0.583 -> 0.567 (-0.017 [-0.075, +0.042]), margin +0.72 [+0.40, +1.09]. No rate tried raised
    accuracy.
    Before these runs the answers were cut at 4 new tokens, so "purple" (5 tokens) could never be named and
    the hacked answers were "purp"; both generations now allow 8 tokens (the metric is unchanged). With the
    cut, the same model's runs read colour 0.825, 0.875, 0.775 before and 0.400, 0.400, 0.625 after.

    What changed the base model's learning, and what did not (random init, 8 pairs per step, greedy
    answers on the 40 held-out clips; "tokens" are video tokens per frame):
    * 4 tokens (patch 8, each token a 16x16-pixel region of which the 6-pixel ball is a small part): no
      setting left the answer prior, on all three questions or on colour alone: hidden 32 and 64, lr 1e-3 to
      3e-3, 100 to 1000 steps, 192 and 400 clips, tower trained or frozen, projector scaled 10x at init;
    * 16 tokens (patch 4, 8x8 pixels each), colour alone, no titles, 96 clips, lr 2e-3: train loss 4.2 to
      0.10 in 150 steps and 0.004 at 300; held-out colour accuracy 0.825 (chance 0.167). The model can read
      the clip once a token is mostly ball;
    * 16 tokens, all three questions, 192 clips, 500 steps (the build budget): lr 2e-3 with titles (the
      model shipped before) and lr 3e-3 without titles both still answer one value per question (held-out 0.500,
      0.275, 0.125). Mixing the questions (and the title-copying examples) delays reading past the budget;
    * 16 tokens, all three questions, the plain loop on tensorised clips (:func:`_sft`; 0.33 s CPU per step of
      8 clips x 3 questions on a quiet core, against 0.41 s per engine step of 8 rows); validation on 40
      ``"held_out"`` clips of seed 99 (not the demo's) and 40 training clips, answers cut at 4 tokens then (so
      "purple" counted wrong: colour is under-read by about 1/6), smooth / direction / colour:
      192 clips, 8 per step, lr 2e-3, 200 steps (109 s CPU): held-out 0.550 / 0.350 / 0.525, train 0.550 /
      0.175 / 0.700; 700 steps (311 s): held-out 0.475 / 0.275 / 0.725, train 0.500 / 0.250 / 0.825, loss 0.23;
      384 clips, 4 per step, 1400 steps (327 s, the shipped model): held-out 0.525 / 0.275 / 0.725, train
      0.525 / 0.350 / 0.825, loss 0.23; 384 clips, 8 per step, lr 5e-3: stopped at step 500 of 650 with train
      loss 0.43 (0.25 at lr 2e-3). Colour is read within 200 steps; direction and smoothness stay at the answer
      prior through 1400 steps, on the training clips too (two distinct direction answers).
    Direction needs the text model to compare the ball's place across frames (the tower sees one frame at a
    time, the frame order lives only in the text model's positions); 2 layers of hidden 64 did not learn it
    within the build budget. The next step: a deeper or wider text model, or a curriculum (direction first).

    Tried afterwards to make it read the motion, none of which did (the shipped model is unchanged): the
    shipped sizes unless said, the :func:`_sft` loop with one warmup-then-cosine schedule over the run, 384
    ``"sft"`` clips, 8 clips per step, lr 2e-3, no titles unless said; validation on 40 ``"held_out"`` clips
    of seed 99 (not the demo's) and 40 training clips, greedy answers of up to 8 tokens; CPU seconds of the
    training loop on one thread. A question alone costs far less per step than all three (0.03 s per step of
    8 clips at 1 frame, 0.08 s at 8 frames, against 0.23 s for 4 clips x 3 questions):
    * the direction question alone (a curriculum's first phase): 300 and 1500 steps of 4 clips with titles
      at 0.2 (14 and 86 s), 1500 steps with 4 text layers (114 s), 600 steps of 16 clips at lr 3e-3 (no
      titles, 95 s), 400 steps with 4 text layers of hidden 128 and 8 heads (70 s), 400 steps with the text
      model's init range 0.1 instead of 0.02 (33 s): one answer to every clip, training clips included
      (held-out direction 0.275-0.325, train 0.30); the train loss stays at the answer prior (0.55 a row),
      the titled runs' fall to 0.44 is the titled fifth copying the title;
    * the projector's output scaled 10x at init, or the LLaVA-NeXT-Video pooler in ``"max"`` mode instead
      of average (direction alone, 500 steps, 44 s each): per-step losses equal to 3 decimals to each
      other's, the answer does not depend on the clip;
    * 2 frames (first and last, 32 video tokens) instead of 8, direction alone: 400 steps (14 s) and
      1000 steps with the position embeddings below x10 (31 s): the prior;
    * colour first (200 steps: held-out colour 1.000 from 16 s) then direction (300 more steps, rope theta
      10000 or 100, position embeddings x10): the prior on direction;
    * the tower's position embeddings scaled 10x or 50x at init (CLIP starts them at std 0.02, about 10x
      weaker than a 4x4 patch's pixel embedding, so a ball token hardly says where it is), direction
      alone, 400 to 1150 steps (33-92 s), 600 steps at lr 5e-4 (45 s), and 3000 steps at 8 frames (280 s)
      or at 2 frames (126 s): one answer; the two 3000-step runs' losses stayed at the prior and equal
      to each other's at every logged step (the answer ignores the clip);
    * a spatial question first, ``"where is the ball?"`` answered ``"top left"`` ... ``"bottom right"``
      (its quadrant): at start and end of the 8 frames, 200-300 steps then direction 300 (position
      embeddings x1 or x10, 47-62 s): the prior on both; on 1 frame (the middle one, 16 video tokens), x1
      or x10, 400 steps (10 s): the prior; x10, 3000 steps (77 s): the loss sat at the prior (0.36-0.38)
      for 2200 steps, then fell to 0.19 by step 3000; x1 (72 s) or 4 text layers (x10, 102 s): no fall
      by 3000; the first 2500 of 4000 steps on one schedule, then direction at 8 frames (stopped at step
      3500, 156 s): no fall, and direction at the prior; the 3000 one-frame steps on their own schedule
      (the fall again, from step 2200), then
      1000 direction steps at 8 frames on theirs (153 s in all): direction at the prior (one answer); at 2
      frames (first and last) instead (108 s): the direction loss stayed at the prior (0.52-0.59).
    Linear probes on the video features of the untrained model (logistic regression on standardised
    features, 200 ``"sft"`` clips, 80 ``"held_out"`` clips of seed 99): direction from the last frame's 16
    tokens minus the first's 1.00 held-out, from all 128 token features 0.975, from the 64-dim token mean
    weighted linearly in time 0.70 (0.95 with the position embeddings x10); the ball's end quadrant from the
    last frame's token mean 0.375 (0.725 with x10). So the clip carries the motion; what the text model
    must learn is the reading. Attention starts uniform: a uniform mean over the video tokens holds the set
    of places the ball visited but not their order, which enters only through the causal prefix means of
    the first layer (weights falling with time); the two arrive summed (direction from that sum: 0.41
    held-out, with x10) and must be told apart, or attention must learn to pick frames by position. Within
    these budgets (up to 4000 steps, 280 CPU s) neither started, except the late fall on the one-frame quadrant.
    So the shipped model is the one described above, and its table above reran with the same numbers on
    seeds 0, 1 and 2 (24-29 s CPU each on one thread, a quieter machine). PhysDPO's recipe (the paper, and
    ``scripts/configs/*_physdpo.yaml``) has no SFT term and no filter on the rejected answers beyond
    "differs from the true one", so the demo adds neither.

    Checked for a bug in the SFT, none found (each on a few ``"sft"`` clips, on the previous model: 500 engine
    steps of 8 rows, 192 clips; the one bug found later was in the evaluation, the 4-token cut above):
    * labels and prompt: a collated batch decoded reads ``"<s>USER: <video tokens>\n[The title of this
      video is "...".\n]<question> ASSISTANT:<answer></s>"``; only the answer and ``</s>`` are labelled
      (e.g. ``no</s>``, 2 tokens); the chosen answer is :func:`clip_answer`'s true value;
    * video features: :meth:`~video.adapter.VideoLLMAdapter.model_inputs` gives the same logits as the
      model's own ``pixel_values_videos`` path (max difference 0.0); decoded frames are uint8 and differ from
      the written ones by at most 1; processed pixels have mean -1.01, std 0.50; the video features differ
      between clips (mean |difference| 0.0025 against a feature std of 0.0155: the ball is a small part of
      each 16x16-pixel token) and the logits at the answer position move with the clip;
    * optimiser: all 248,448 parameters are trained and receive gradients (tower, projector, text model);
      a plain AdamW loop outside the engine (no schedule, clipping 1.0) behaves the same: on the colour
      question alone, without titles, the train loss stops at 0.58-0.66 per token (the colour prior) by step
      300 at lr 1e-3, 2e-3 and 3e-3, with the tower trained or frozen and with the projector's weights
      scaled 10x at init; with the title always in the prompt it falls from 3.4 to 0.004 in 200 steps
      (copying from the prompt is learned). That model does not memorise its own training clips
      either: the candidate with the highest log-prob is right at chance on 24 of them without a title
      (0.50, 0.17, 0.00), and partly right with the title (0.50, 0.29, 0.46);
    * generation: greedy answers use the training prompt (:func:`video.adapter.render_video_prompt`),
      equal the highest-log-prob candidate, and do not depend on the batch.
    So the limit is optimisation, not a bug: with 4 tokens per frame (the checks above, on that model) the
    ball's signal is too faint for the text model to learn to read within the budget.

    Noise over seeds 0, 1, 2 (each seed draws its own "physdpo" and "held_out" clips): before, 0.50-0.60
    smooth, 0.25-0.28 direction, 1.00 colour; the change in overall accuracy -0.13 to -0.28 (every interval at
    or below 0); the margin change +7.3 to +8.9 nats (each interval about +-2.3). The per-question intervals
    on 40 items are about +-0.25.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "QUESTIONS",
    "ToyVideoConfig",
    "VideoItem",
    "answer_correct",
    "build_toy_video_llm",
    "clip_answer",
    "clip_title",
    "DemoConfig",
    "demo_physdpo",
    "load_toy_video_llm",
    "toy_clips",
]

#: The three questions asked about every clip (kind -> question).
QUESTIONS: dict[str, str] = {
    "smooth": "does the ball move smoothly?",
    "direction": "which way does the ball move?",
    "colour": "what colour is the ball?",
}
_DIRECTIONS = ("left", "right", "up", "down")
_SPLIT_IDS = {"sft": 1, "physdpo": 2, "held_out": 3}
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "toy_models" / "video"


@dataclass(frozen=True)
class ToyVideoConfig:
    """Sizes and budgets of the toy video LLM and its SFT (the defaults are the shipped model's)."""

    frames: int = 8
    size: int = 32
    vision_hidden: int = 64
    vision_layers: int = 2
    patch_size: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    sft_clips: int = 384
    title_fraction: float = 0.2
    sft_steps: int = 1400
    sft_batch: int = 4
    sft_lr: float = 2e-3


def _candidates(kind: str) -> tuple[str, ...]:
    from mmalign.toyworld import COLOURS

    return {"smooth": ("yes", "no"), "direction": _DIRECTIONS, "colour": tuple(COLOURS)}[kind]


def clip_answer(kind: str, facts: dict[str, Any]) -> str:
    """The true one-word answer to :data:`QUESTIONS` ``[kind]`` for a clip with ``facts``."""
    if kind == "smooth":
        return "yes" if facts["rule"] == "constant" else "no"
    if kind == "direction":
        return str(facts["direction"])
    if kind == "colour":
        return str(facts["colour"])
    raise ValueError(f"unknown question kind {kind!r}; known: {list(QUESTIONS)}")


def clip_title(facts: dict[str, Any]) -> str:
    """The clip's true title, e.g. ``"a red ball moves left smoothly"`` / ``"a red ball moves left and jumps"``."""
    how = "smoothly" if facts["rule"] == "constant" else "and jumps"
    return f"a {facts['colour']} ball moves {facts['direction']} {how}"


def answer_correct(kind: str, answer: str, facts: dict[str, Any]) -> bool:
    """Whether a free-text ``answer`` names the true value and no other candidate (lenient: case, punctuation)."""
    words = set("".join(c if c.isalnum() else " " for c in answer.lower()).split())
    named = {c for c in _candidates(kind) if c in words}
    return named == {clip_answer(kind, facts)}


@dataclass
class VideoItem:
    """One toy clip: frames ``(T, H, W, 3)`` uint8, its facts, and its file once written."""

    name: str
    frames: np.ndarray
    facts: dict[str, Any]
    path: Path | None = None


def toy_clips(n: int, split: str, *, seed: int = 0, frames: int = 8, size: int = 32) -> list[VideoItem]:
    """``n`` motion clips of ``split`` (``"sft"``, ``"physdpo"``, ``"held_out"``: disjoint seed streams), half
    of them constant-velocity and half teleporting, in a seeded order."""
    from mmalign.toyworld import motion_clip

    if split not in _SPLIT_IDS:
        raise ValueError(f"toy_clips: split must be one of {list(_SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    rules = ["constant", "teleport"] * (n // 2) + ["constant"] * (n % 2)
    rng.shuffle(rules)
    items = []
    for i, rule in enumerate(rules):
        clip, facts = motion_clip(rng, frames=frames, size=size, rule=rule)
        items.append(VideoItem(f"{split}{i:04d}", clip, facts))
    return items


def _write_clips(items: list[VideoItem], folder: Path) -> None:
    """Each clip to ``folder/<name>.mkv`` (FFV1: lossless, so colours and positions survive the file)."""
    from video.frames import write_video

    for item in items:
        item.path = write_video(folder / f"{item.name}.mkv", item.frames, fps=8, codec="ffv1", gop_size=1)


def _model_config(config: ToyVideoConfig, folder: Path) -> Any:
    """The tiny LLaVA-NeXT-Video config of ``folder`` widened to ``config``'s sizes."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(folder)
    vision, text = model_config.vision_config, model_config.text_config
    vision.hidden_size, vision.intermediate_size = config.vision_hidden, 2 * config.vision_hidden
    vision.num_hidden_layers = config.vision_layers
    vision.patch_size = config.patch_size
    vision.projection_dim = config.vision_hidden
    text.hidden_size, text.intermediate_size = config.text_hidden, 2 * config.text_hidden
    text.num_hidden_layers = config.text_layers
    text.head_dim = config.text_hidden // text.num_attention_heads
    return model_config


def _sft_rows(adapter: Any, items: list[VideoItem], root: Path) -> list[dict[str, Any]]:
    """Each clip tensorised once through ``adapter.collate``: its pixels and, per question, the token ids and labels
    of the plain prompt and of the prompt with the clip's true title (the rows the engine's SFT would see)."""
    from mmalign.pairs import PreferencePair
    from mmalign.prompts import with_title

    out = []
    for item in items:
        assert item.path is not None
        pairs = []
        for kind, question in QUESTIONS.items():
            answer = clip_answer(kind, item.facts)
            wrong = next(c for c in _candidates(kind) if c != answer)
            for prompt in (question, with_title(question, clip_title(item.facts))):
                pairs.append(PreferencePair(f"{item.name}/{kind}", prompt, answer, wrong, [item.path.name],
                                            [item.path.name]).with_root(root))
        batch = adapter.collate(pairs)
        rows = []
        for i in range(len(pairs)):  # chosen rows, in the order (kind, plain / titled)
            keep = batch["attention_mask"][i].bool()
            rows.append((batch["input_ids"][i][keep], batch["labels"][i][keep]))
        (video,) = batch["video_inputs"]
        out.append({"video": video, "tokens": int(batch["video_tokens"][0]),
                    "rows": [(rows[2 * k], rows[2 * k + 1]) for k in range(len(QUESTIONS))]})
    return out


def _sft_batch(clips: list[dict[str, Any]], titled: np.ndarray, pad_id: int) -> dict[str, Any]:
    """A batch in :class:`video.adapter.VideoLLMAdapter`'s layout: every question of each clip (one video encoding
    per clip), the titled prompt where ``titled[clip, kind]``."""
    rows = [(c, clip["rows"][k][int(titled[c, k])]) for c, clip in enumerate(clips) for k in range(len(QUESTIONS))]
    width = max(len(ids) for _, (ids, _) in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (_, (ids, lab)) in enumerate(rows):
        input_ids[r, : len(ids)], attention_mask[r, : len(ids)], labels[r, : len(ids)] = ids, 1, lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "video_inputs": [clip["video"] for clip in clips],
            "row_videos": torch.tensor([c for c, _ in rows], dtype=torch.long),
            "video_tokens": torch.tensor([clip["tokens"] for clip in clips], dtype=torch.long)}


def _sft(model: Any, adapter: Any, clips: list[dict[str, Any]], config: ToyVideoConfig, seed: int,
         progress: bool) -> list[float]:
    """Plain SFT on pre-tensorised clips: AdamW, linear warmup then cosine, gradient clipping 1.0; each step takes
    ``config.sft_batch`` clips (without replacement within an epoch) with all their questions, each titled with
    probability ``config.title_fraction``. The forward is the adapter's (:meth:`~video.adapter.VideoLLMAdapter.
    model_inputs`); the loss is the mean cross-entropy of the labelled tokens (answer and ``</s>``). Returns the
    per-step losses."""
    from mmalign.utils import seeded

    rng = np.random.default_rng([seed, 7])
    pad_id = adapter.tokenizer.pad_token_id
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, weight_decay=0.0)
    warmup = max(1, config.sft_steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, config.sft_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, rate)
    order: list[int] = []
    losses = []
    model.train()
    with seeded(seed):
        for step in range(config.sft_steps):
            if len(order) < config.sft_batch:
                order += [int(i) for i in rng.permutation(len(clips))]
            chosen, order = order[: config.sft_batch], order[config.sft_batch :]
            titled = rng.random((len(chosen), len(QUESTIONS))) < config.title_fraction
            batch = _sft_batch([clips[i] for i in chosen], titled, pad_id)
            targets = batch["labels"][:, 1:]
            keep = torch.nonzero((targets != -100).any(0)).flatten()  # logits only where some row is labelled
            logits = model(**adapter.model_inputs(model, batch), logits_to_keep=keep).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     targets[:, keep].reshape(-1), ignore_index=-100)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if progress and (step + 1) % 100 == 0:
                print(f"sft step {step + 1}/{config.sft_steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    model.eval()
    return losses


def build_toy_video_llm(
    out_dir: str | Path, *, seed: int = 0, progress: bool = True, config: ToyVideoConfig | None = None
) -> Path:
    """Train the toy video LLM from scratch by SFT and save it to ``out_dir``.

    A LLaVA-NeXT-Video model (the tiny family of :func:`mmalign.tiny.make_tiny_llava_next_video`, widened to
    ``config``'s sizes) learns to answer :data:`QUESTIONS` about ``config.sft_clips`` motion clips for
    ``config.sft_steps`` steps (:func:`_sft`: the clips are decoded and tensorised once through
    :class:`video.adapter.VideoLLMAdapter`, then a plain AdamW loop): short of convergence on purpose. Saved with
    ``save_pretrained`` (safetensors) with its processor; ``toy_build.json`` records the settings. Loads with
    :func:`load_toy_video_llm`.
    """
    from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration

    from mmalign.tiny import make_tiny_llava_next_video, seeded
    from video.adapter import VideoLLMAdapter
    from video.frames import FrameSampling

    config = config or ToyVideoConfig()
    out = Path(out_dir)
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = make_tiny_llava_next_video(tmp / "base", seed=seed)
        processor = AutoProcessor.from_pretrained(base)
        processor.patch_size = config.patch_size  # video tokens per frame: (size / patch)^2 / 4 (2x2 pooling)
        with seeded(seed):
            model = LlavaNextVideoForConditionalGeneration(_model_config(config, base))
        model.generation_config = LlavaNextVideoForConditionalGeneration.from_pretrained(base).generation_config
        items = toy_clips(config.sft_clips, "sft", seed=seed, frames=config.frames, size=config.size)
        _write_clips(items, tmp / "clips")
        adapter = VideoLLMAdapter(processor, media_root=tmp / "clips", sampling=FrameSampling(num_frames=config.frames))
        clips = _sft_rows(adapter, items, tmp / "clips")
        losses = _sft(model, adapter, clips, config, seed, progress)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    facts = {"seed": seed, "config": config.__dict__, "sft_steps": len(losses),
             "final_loss": float(np.mean(losses[-20:])) if losses else None,
             "cpu_s": round(time.process_time() - start, 1)}
    (out / "toy_build.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out


def load_toy_video_llm(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of the toy video LLM at ``path`` (default ``toy_models/video``, built when missing),
    through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``."""
    from vision.train import load_vlm

    folder = Path(path) if path is not None else SHIPPED
    if not (folder / "config.json").is_file():
        build_toy_video_llm(folder)
    return load_vlm(str(folder))


# ---------------------------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class DemoConfig:
    """The PhysDPO demo's data, hacks and DPO settings (fixed before any run; see the module docstring)."""

    train_clips: int = 48
    eval_clips: int = 40
    hack_frames: int = 1
    hack_scale: float = 16.0
    temperature: float = 0.2
    max_new_tokens: int = 8
    beta: float = 0.1
    learning_rate: float = 5e-4
    num_epochs: int = 2
    batch_size: int = 8
    grid_clips: int = 6


def _records(items: list[VideoItem], folder: Path, name: str) -> Path:
    """PhysDPO input records (:func:`video.physdpo.read_video_qa`): clip x question, true answer and title."""
    from mmalign.files import atomic_write_bytes

    rows = []
    for item in items:
        assert item.path is not None
        for kind, question in QUESTIONS.items():
            rows.append({"id": f"{item.name}-{kind}", "video": item.path.relative_to(folder).as_posix(),
                         "question": question, "answer": clip_answer(kind, item.facts), "title": clip_title(item.facts)})
    path = folder / name
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _physdpo(model: Any, processor: Any, records: Path, out_dir: Path, config: DemoConfig, seed: int,
             progress: bool) -> Any:
    from video.physdpo import PhysDPOConfig, build_physdpo_pairs

    physdpo = PhysDPOConfig(
        records=str(records), out_dir=str(out_dir), num_frames=_FRAMES, hack_frames=config.hack_frames,
        hack_scale=config.hack_scale, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        batch_size=64, seed=seed, progress=progress,
    )
    return build_physdpo_pairs(model, processor, physdpo, rank=0, world_size=1)


_FRAMES = ToyVideoConfig().frames


def _answers(model: Any, processor: Any, items: list[VideoItem]) -> dict[str, list[str]]:
    """Greedy answers to every question about every clip (clean frames, plain question)."""
    from video.frames import FrameSampling, load_clip
    from video.generate import generate_video_responses
    from vision.generate import GenerationSettings

    assert all(item.path is not None for item in items)
    clips = [load_clip(item.path, FrameSampling(num_frames=_FRAMES)) for item in items]  # type: ignore[arg-type]
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0, batch_size=64)  # "purple" is 5 tokens
    return {kind: generate_video_responses(model, processor, [q] * len(items), clips, [0] * len(items), greedy)
            for kind, q in QUESTIONS.items()}


@torch.no_grad()
def _margins(model: Any, processor: Any, pairs: list[Any]) -> np.ndarray:
    """``logp(chosen) - logp(rejected)`` of each pair on its clean clip and plain question (summed log-probs)."""
    from video.adapter import VideoLLMAdapter
    from video.frames import FrameSampling

    adapter = VideoLLMAdapter(processor, sampling=FrameSampling(num_frames=_FRAMES))
    model.eval()
    out = []
    for start in range(0, len(pairs), 32):
        values = adapter.logps(model, adapter.collate(pairs[start : start + 32]))
        out.append((values.chosen - values.rejected).double())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _strip(frames: np.ndarray, scale: int = 2) -> np.ndarray:
    """The clip's frames side by side (one image), enlarged ``scale`` times."""
    strip = np.concatenate(list(frames), axis=1)
    return strip.repeat(scale, axis=0).repeat(scale, axis=1)


def demo_physdpo(
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    config: DemoConfig | None = None,
    model_path: str | Path | None = None,
) -> list[Any]:
    """PhysDPO on the shipped toy video LLM, evaluated before and after on held-out clips; see the module docstring.

    Writes ``out/physdpo/``: ``rows.json``, ``before_after.png`` (held-out clips' frames with each question's
    answer before and after), the engine's ``train/metrics.jsonl`` and ``train/metrics.png``, the pair folders
    and ``answers.json``. Returns the :class:`mmalign.report.DemoRow` list (also in ``rows.json``).
    """
    from mmalign.engine import TrainConfig
    from mmalign.files import atomic_write_bytes
    from mmalign.pairs import read_pairs
    from mmalign.report import DemoRow, paired_bootstrap, save_before_after
    from video.train import VideoTrainConfig, run

    torch.set_num_threads(1)
    config = config or DemoConfig()
    folder = Path(out) / "physdpo"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "clips").mkdir(parents=True)
    model_dir = Path(model_path) if model_path is not None else SHIPPED
    model, processor = load_toy_video_llm(model_dir)

    train_items = toy_clips(config.train_clips, "physdpo", seed=seed, frames=_FRAMES)
    eval_items = toy_clips(config.eval_clips, "held_out", seed=seed, frames=_FRAMES)
    _write_clips(train_items + eval_items, folder / "clips")
    train_records = _records(train_items, folder, "train_records.jsonl")
    eval_records = _records(eval_items, folder, "held_out_records.jsonl")

    # before: greedy answers, and the held-out PhysDPO pairs (the SFT model's hacked answers, fixed text)
    before = _answers(model, processor, eval_items)
    _physdpo(model, processor, eval_records, folder / "held_out_pairs", config, seed + 1, progress)
    held_pairs = read_pairs(folder / "held_out_pairs")
    margin_before = _margins(model, processor, held_pairs)
    # the method: PhysDPO pairs from the policy's own hacked answers on the training clips, then DPO
    report = _physdpo(model, processor, train_records, folder / "pairs", config, seed, progress)
    del model
    train_config = TrainConfig(
        output_dir=str(folder / "train"), loss="dpo", loss_kwargs={"beta": config.beta},
        learning_rate=config.learning_rate, batch_size=config.batch_size, max_steps=0, num_epochs=config.num_epochs,
        seed=seed, trackers=[], progress=progress, plot=True, keep_last=1, overwrite_output_dir=True,
    )
    result = run(VideoTrainConfig(model=str(model_dir), data=str(folder / "pairs"), num_frames=_FRAMES,
                                  check_videos=False, train=train_config))
    policy = result.model
    after = _answers(policy, processor, eval_items)
    margin_after = _margins(policy, processor, held_pairs)

    rows = []
    correct: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind in QUESTIONS:
        b = np.array([answer_correct(kind, a, it.facts) for a, it in zip(before[kind], eval_items, strict=True)], float)
        a = np.array([answer_correct(kind, a, it.facts) for a, it in zip(after[kind], eval_items, strict=True)], float)
        correct[kind] = (b, a)
    correct["all"] = (np.concatenate([v[0] for v in correct.values()]), np.concatenate([v[1] for v in correct.values()]))
    for kind, (b, a) in correct.items():
        _, lo, hi = paired_bootstrap(b, a, seed=seed)
        what = "all three questions" if kind == "all" else f"{QUESTIONS[kind]!r}"
        rows.append(DemoRow("physdpo", f"held-out answer accuracy ({kind})", float(b.mean()), float(a.mean()), lo, hi,
                            len(b), f"greedy answer names the true value, {what}, clean clip, no title"))
    if len(held_pairs):
        _, lo, hi = paired_bootstrap(margin_before, margin_after, seed=seed)
        rows.append(DemoRow("physdpo", "held-out DPO margin (logp chosen - logp rejected)", float(margin_before.mean()),
                            float(margin_after.mean()), lo, hi, len(held_pairs),
                            f"held-out PhysDPO pairs of the SFT model; implicit reward margin after = "
                            f"{config.beta} x the change"))

    shown = eval_items[: config.grid_clips]
    strips = [_strip(it.frames) for it in shown]
    labels = ["; ".join(f"{kind}: {before[kind][i].strip() or '-'} -> {after[kind][i].strip() or '-'} "
                        f"(true {clip_answer(kind, it.facts)})" for kind in QUESTIONS) for i, it in enumerate(shown)]
    save_before_after(strips, strips, labels, folder / "before_after.png", ncol=2, scale=1)
    answers = [{"clip": it.name, "facts": {k: v for k, v in it.facts.items() if k != "positions"},
                "before": {k: before[k][i] for k in QUESTIONS}, "after": {k: after[k][i] for k in QUESTIONS}}
               for i, it in enumerate(eval_items)]
    atomic_write_bytes(folder / "answers.json", json.dumps(answers, indent=1).encode())
    summary = {"seed": seed, "config": asdict(config), "pairs_written": report.written, "pairs_by_hack": report.counts,
               "held_out_pairs": len(held_pairs), "dpo_steps": result.global_step,
               "rows": [asdict(r) for r in rows]}
    atomic_write_bytes(folder / "rows.json", json.dumps(summary, indent=2).encode())
    return rows
