"""A toy VLM that hallucinates, and STIC, POVID and SCL run on it (toy-world evidence, nothing downloaded).

The base model (:func:`build_toy_vlm`)
    A LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``; CLIP tower on 32 px images, patch 4,
    64 image tokens (with patch 8 the tower did not learn colours in 600 steps); Llama text model; hidden
    64, 2 layers each; a byte-level BPE whose merges make every
    world word and prompt word one token) trained from random init by SFT (the engine's ``loss="sft"``
    rows and loss, run by a plain PyTorch loop on tensors made once: pixel values per image, token ids
    per prompt; AdamW at ``SFT_LR``, cosine, ``SFT_STEPS`` steps of ``SFT_BATCH``) on images of the
    *train* split of :mod:`mmalign.toyworld` (12 of the 18 colour/shape
    combinations; every kind: single, count, pair). It learns to describe them (the world's exact caption,
    under the plain describe prompts and STIC's step-by-step prompt), to answer their questions with one
    word (also under SCL's first- and second-turn prompts), and, asked by one of STIC's hallucination
    prompts to imagine, to name a made-up scene. It never sees the six held-out combinations, so on
    held-out images it tends to say a combination it knows: the hallucinations the methods are meant to fix.

The held-out set (fixed before any run; :func:`eval_scenes`)
    ``N_EVAL`` scenes per kind of the *held_out* split (seed ``EVAL_SEED``), every question of each scene.
    No method sees these images (their pools use other seeds). Metrics, greedy decoding:

    * ``answer accuracy``: :func:`mmalign.toyworld.answer_correct` of the answer to each question
      (the plain question as prompt), one item per question;
    * ``description accuracy``: the description (prompt ``"Describe the image."``) names every colour,
      shape and count right and nothing else (:func:`mmalign.toyworld.caption_facts` all true, not
      hallucinated), one item per scene;
    * ``hallucination rate``: the description names a colour or shape the scene does not have; lower is
      better.

    Each row's interval is the 95% paired bootstrap of (after - before) over the items
    (:func:`mmalign.report.paired_bootstrap`).

The methods (each on its own pool of images: ``N_POOL`` scenes per kind and split, both splits, seeds
other than the evaluation's; the project's own code path; hyperparameters below)

    * STIC (:func:`demo_stic`), its three stages: stage 1 :func:`vision.stic.build_stic_pairs` on the
      pool's PNG files, with no label (chosen: the policy's description under the step-by-step prompt,
      temperature 0.2; rejected: a hallucination prompt on the clean image, or a describe prompt on the
      ``stic_lowres`` / ``stic_color_jitter`` image); stage 2 :func:`vision.stic.train_stic_dpo` with
      :func:`vision.stic.stic_dpo_config` (DPO beta 0.1 + chosen NLL / 1024, cosine, 3% warmup, 1 epoch,
      8 pairs per step); stage 3, description-infused SFT: the stage-2 model describes each pool image
      (a describe prompt drawn per image, temperature 0.2, as STIC describes its instruction images),
      :func:`vision.stic.build_description_infused_set` puts that description before every question
      of the pool scene with its ground-truth answer (the toy's instruction data: 816 records), and
      :func:`vision.stic.train_description_infused` trains on them with
      :func:`vision.stic.stic_sft_config` (mean token NLL of the answer, cosine, 3% warmup, 1 epoch, 32
      per step). The evaluation is the same as for every method (plain questions, ``"Describe the
      image."``): no description is put before the held-out questions. The rows ``STIC stage 2`` are
      measured after stage 2, before stage 3; ``STIC`` is the whole recipe.
    * POVID (:func:`demo_povid`): :func:`vision.povid.build_povid_pairs` on the pool's ground-truth
      descriptions and answers: the text negative is the ground truth rewritten by the toy's text rule
      (:func:`toy_hallucination_rewrite`: one colour, shape, number or side swapped for another, the
      rewriter a rule instead of a language model), the image negative the online one (argmax tokens
      read on the diffusion-noised image, t = 500); then :func:`vision.povid.run_povid_recipe`: stage 1
      DPO on the text pairs (3 epochs), stage 2 both pair sets with POVID's 0.5 / 0.5 weights (1 epoch),
      beta 0.1, cosine, 3% warmup.
    * SCL (:func:`demo_scl`): :func:`vision.scl.build_scl_pairs` on the pool's questions (two turns: the
      SCL question, then a review prompt; a pair when one turn is right and the other wrong, as read by
      :func:`mmalign.toyworld.answer_correct`), then :func:`vision.train.run` with SCL's recipe (DPO
      beta 0.1 + SFT 0.1 on the chosen answer, 3 epochs, cosine, 3% warmup).

    The papers train LoRA adapters on a pretrained 7B model with learning rates of 1e-7 (STIC's DPO,
    POVID), 2e-5 (STIC's stage 3) and 5e-5 (SCL). A 0.5M-parameter model trained from scratch moves far
    less per step at those rates, so the demos fine-tune all weights at the rates in :data:`DEMO_LR`
    (one rate, 2e-4, for every stage; the loss, beta, SFT weights, schedule, warmup, epochs and
    examples per step are the papers').

    The control of STIC's stage 3 (:func:`control_stic_sft_only`, not a demo): stage 3's SFT on the
    very description-infused set of the whole-recipe run (descriptions by the stage-2 model, the same
    816 records, recipe, seed and 25 steps), started from the base model, without the DPO. Stage 3
    trains on ground-truth answers, so it may raise answer accuracy by itself; the rows ``STIC vs
    stage 3 alone`` pair the whole recipe's items against the control's, so their change is what the
    DPO stages add.

Measured (``python scripts/toy_vision.py --out runs/toy_vision --seed S``, S = 0, 1, 2; STIC and its
control: ``--only stic,stic_sft_only``)
    The base model: held-out set (below) answer accuracy 0.459, description accuracy 0.042,
    hallucination 0.758; on 40 train-split scenes per kind (seed 99) 0.651 / 0.433 / 0.292. Built in
    287 s CPU (one thread, shared 2-core machine; a second build, 260 s, gave the same
    ``model.safetensors`` byte for byte on that machine; on another CPU two rebuilds agreed with each
    other, 110 s each, but not with the shipped file: floating-point rounding differs between CPUs). Train-split answers by question (20 scenes per
    kind, seed 99): colour of a single or count scene 1.00, its shape 0.44-0.90, counts of a count scene
    0.55; pair questions 0.35-0.68 and left/right 0.50 (chance): the binding of the two objects to their
    sides is not learned, so the aim of train answers >= 0.85 is not reached.

    Held-out set: 120 scenes (40 per kind), 680 questions, the same model and set for every seed (the
    seed changes the pools, sampling and data order). Change = after - before, 95% paired bootstrap.
    CPU per seed: STIC 18 / 17 / 17 s (the three stages; the control 7 / 8 / 7 s more), POVID 53 / 51 /
    45 s, SCL 17 / 15 / 14 s (one thread). Rows ``STIC stage 2``: after stages 1-2, before stage 3;
    ``STIC``: the whole recipe; ``STIC stage 3 alone``: the control; ``STIC vs stage 3 alone``: the
    whole recipe against the control, item by item (before: the control's after, ``ctl``).

    =====================  ====================  ======  ===============================
    method                 metric                before  after; change [95% CI],
                                                         seed 0 / 1 / 2
    =====================  ====================  ======  ===============================
    STIC stage 2           answer accuracy        0.459  0.487 +0.028 [+0.007, +0.050]
                                                         / 0.471 +0.012 [-0.012, +0.035]
                                                         / 0.465 +0.006 [-0.018, +0.031]
    STIC stage 2           description accuracy   0.042  0.008 -0.033 [-0.067, -0.008]
                                                         / 0.017 -0.025 [-0.058, +0.008]
                                                         / 0.008 -0.033 [-0.067, -0.008]
    STIC stage 2           hallucination rate     0.758  0.767 +0.008 [-0.050, +0.067]
                                                         / 0.758 +0.000 [-0.058, +0.058]
                                                         / 0.767 +0.008 [-0.050, +0.067]
    STIC                   answer accuracy        0.459  0.478 +0.019 [-0.012, +0.049]
                                                         / 0.485 +0.026 [-0.003, +0.056]
                                                         / 0.496 +0.037 [+0.009, +0.066]
    STIC                   description accuracy   0.042  0.050 +0.008 [-0.033, +0.050]
                                                         / 0.000 -0.042 [-0.083, -0.008]
                                                         / 0.008 -0.033 [-0.075, +0.000]
    STIC                   hallucination rate     0.758  0.792 +0.033 [-0.017, +0.083]
                                                         / 0.783 +0.025 [-0.033, +0.084]
                                                         / 0.758 +0.000 [-0.058, +0.058]
    STIC stage 3 alone     answer accuracy        0.459  0.476 +0.018 [-0.013, +0.047]
                                                         / 0.484 +0.025 [-0.006, +0.054]
                                                         / 0.491 +0.032 [+0.003, +0.063]
    STIC stage 3 alone     description accuracy   0.042  0.033 -0.008 [-0.050, +0.025]
                                                         / 0.017 -0.025 [-0.067, +0.008]
                                                         / 0.017 -0.025 [-0.067, +0.008]
    STIC stage 3 alone     hallucination rate     0.758  0.800 +0.042 [-0.017, +0.100]
                                                         / 0.808 +0.050 [-0.008, +0.108]
                                                         / 0.800 +0.042 [-0.017, +0.100]
    STIC vs stage 3 alone  answer accuracy          ctl  0.478 +0.001 [-0.007, +0.010]
                                                         / 0.485 +0.001 [-0.009, +0.012]
                                                         / 0.496 +0.004 [-0.007, +0.016]
    STIC vs stage 3 alone  description accuracy     ctl  0.050 +0.017 [-0.017, +0.050]
                                                         / 0.000 -0.017 [-0.042, +0.000]
                                                         / 0.008 -0.008 [-0.025, +0.000]
    STIC vs stage 3 alone  hallucination rate       ctl  0.792 -0.008 [-0.042, +0.017]
                                                         / 0.783 -0.025 [-0.092, +0.033]
                                                         / 0.758 -0.042 [-0.092, +0.008]
    POVID                  answer accuracy        0.459  0.521 +0.062 [+0.031, +0.091]
                                                         / 0.535 +0.076 [+0.035, +0.121]
                                                         / 0.501 +0.043 [+0.004, +0.078]
    POVID                  description accuracy   0.042  0.092 +0.050 [-0.017, +0.117]
                                                         / 0.175 +0.133 [+0.058, +0.208]
                                                         / 0.133 +0.092 [+0.017, +0.167]
    POVID                  hallucination rate     0.758  0.633 -0.125 [-0.208, -0.042]
                                                         / 0.467 -0.292 [-0.383, -0.192]
                                                         / 0.567 -0.192 [-0.275, -0.117]
    SCL                    answer accuracy        0.459  0.513 +0.054 [+0.025, +0.084]
                                                         / 0.500 +0.041 [+0.013, +0.069]
                                                         / 0.476 +0.018 [-0.010, +0.044]
    SCL                    description accuracy   0.042  0.008 -0.033 [-0.075, +0.000]
                                                         / 0.025 -0.017 [-0.042, +0.000]
                                                         / 0.042 +0.000 [-0.042, +0.042]
    SCL                    hallucination rate     0.758  0.767 +0.008 [-0.042, +0.058]
                                                         / 0.775 +0.017 [-0.017, +0.050]
                                                         / 0.758 +0.000 [-0.050, +0.050]
    =====================  ====================  ======  ===============================

    (hallucination rate: lower is better.) Pairs, seed 0 / 1 / 2: STIC 96 / 104 / 97 from 144
    unlabelled images (the rest refused: the rejected description broke a pair rule), 12 / 13 / 12 DPO
    steps; chosen descriptions free of hallucination 49% / 40% / 35%, rejected ones hallucinating 72% /
    75% / 73%; stage 3, 816 description-infused records (every question of the 144 pool scenes), 25
    SFT steps of 32 (the epoch's last 16 records left out), the stage-2 model's descriptions free of
    hallucination 44% / 44% / 44%, answer NLL per token (mean of the first and of the last three steps)
    0.33 -> 0.28 / 0.32 -> 0.24 / 0.31 -> 0.26 (the control: 0.32 -> 0.27 / 0.31 -> 0.24 / 0.29 ->
    0.26). POVID 288 text + 288 image pairs, 108 + 72 DPO steps. SCL 68 / 73 / 56 flips of 288
    two-turn answers (improved 35 / 33 / 27, worsened 33 / 40 / 29), 24 / 27 / 21 steps.

    Reading: POVID (the recipe as is, DPO without an SFT term, ``DEMO_LR`` unchanged) helps on every
    seed, beyond its interval: hallucination -0.13 to -0.29, answers +0.04 to +0.08, descriptions up on
    seeds 1 and 2. SCL raises answer accuracy on seeds 0 and 1 (+0.05, +0.04; seed 2 +0.02, inside its
    interval) and leaves descriptions alone (it trains answers only). STIC's stages 1-2 do not help:
    answers +0.03 on seed 0 only, and description accuracy falls (-0.03 on seeds 0 and 2), because the
    chosen side is the model's own description and half or more of those hallucinate on this base model.
    The whole recipe raises answers by +0.019 / +0.026 / +0.037 (beyond its interval on seed 2 only) and
    does not improve descriptions (+0.008 / -0.042 / -0.033, the fall on seed 1 beyond its interval) or
    hallucination (+0.033 / +0.025 / 0.000; inside the intervals, none lower). The control says where
    the answer gain comes from: stage 3 alone, on the same records, gives +0.018 / +0.025 / +0.032, and
    the whole recipe is only +0.001 / +0.001 / +0.004 above it (intervals within -0.009 and +0.016). The
    DPO stages add nothing measurable to answers once stage 3 has run (seed 0's +0.028 after stage 2 is
    +0.019 after stage 3), and their differences on descriptions (+0.02 / -0.02 / -0.01) and
    hallucination (-0.01 / -0.03 / -0.04) are inside the intervals. So on this toy the whole recipe's
    small answer gain is what supervised fine-tuning on true answers gives by itself, not an effect of
    self-training on image comprehension; its stage 3 prepends descriptions of which 56% hallucinate,
    and the held-out questions come without one.

    STIC's stage 3 here was fixed before any run and not tuned on the held-out set: every pool
    question (official STIC infuses about 5k instruction records against about 6k stage-1 images,
    here 816 against 144), the paper's recipe but the demo's rate 2e-4. Not tried: more epochs or a
    higher rate for stage 3, descriptions put before the held-out questions (a different evaluation).

    What was tried for the base model (CPU seconds of one thread, shared machine; held-out / train as
    answer, description, hallucination):

    * the previous build, engine SFT at lr 3e-3, 1000 steps of 16: 453 s; 0.343 / 0.000 / 0.908 held
      out, 0.48 / 0.08 / 0.74 train (patch 8 and 600 steps before it: no colours learned);
    * the plain loop of :func:`build_toy_vlm` (engine-equal rows and loss, LM head on response tokens
      only, length-sorted batches: 0.14 s a step instead of 0.45), lr 3e-3, 2000 steps: 286 s;
      0.350 / 0.000 / 0.892, train 0.438 / 0.100 / 0.725: more steps alone do not help;
    * a probe, colour questions of single scenes only, 200 steps: colour accuracy 0.20 at lr 1e-2, 0.73
      at 3e-3, 1.00 at 1e-3, 0.83 at 5e-4: lr 3e-3 was too high;
    * the plain loop at lr 1e-3, 2000 steps: 278 s; 0.501 / 0.000 / 0.775, train 0.641 / 0.408 / 0.308
      (pair questions at chance);
    * the same with 4 questions per pair scene instead of 2 (shipped): 287 s; 0.459 / 0.042 / 0.758,
      train 0.651 / 0.433 / 0.292.

    Pair-heavy data mixes, tried afterwards and not shipped (a faster machine: the shipped recipe rebuilt
    there took 114 s, gave train 0.662 / 0.383 / 0.292 and held out 0.472 / 0.025 / 0.792, and its
    ``model.safetensors`` differed from the shipped one). Train is 40 train-split scenes per kind (seed
    99); left/right is the 80 "is the X on the left or the right?" questions of its pair scenes:

    * all 11 questions of every pair scene (7563 records, 58% of them pair questions, against 34%), 2000
      steps: 108 s; 0.474 / 0.008 / 0.767, train 0.651 / 0.375 / 0.233; pair questions 0.57 (shipped
      0.56), left/right 0.49;
    * the same with twice the pair scenes (800): 110 s; 0.418 / 0.017 / 0.800, train 0.626 / 0.308 /
      0.325; pair questions 0.57, left/right 0.50;
    * all 11 pair questions and 5000 steps at lr 1e-3: 271 s, final loss 0.19 (shipped 0.25); 0.457 /
      0.000 / 0.775, train 0.697 / 0.458 / 0.242; pair questions 0.62 (the colour-of-shape and
      shape-of-colour ones 0.74, shipped 0.59), left/right 0.50.

    Left/right stays at chance in every try: the shipped model and the 5000-step one answer "right" to
    all 80 left/right questions, and name the colour or shape of the object on a given side right 0.41-0.46
    of the time on train pair scenes (a guess between the two objects would give 0.5). More pair data and more steps fit the train data
    better but do not teach the binding of the objects to their sides.

    A wider or a deeper model (the rule, written down before its runs; a probe, the shipped model is not
    rebuilt by it): the shipped recipe (2000 steps, lr 1e-3) with hidden size 128 instead of 64, and with
    4 language-model layers instead of 2, on this (faster) machine; each is read on the same 80 left/right
    questions of 40 train pair scenes (seed 99) and on the held-out set. A model that reaches left/right
    >= 0.70 is worth a rebuild of the shipped one (and a rerun of the three methods); below that, the
    capacity is not what is missing.

    Result (one thread): hidden 128, 314 s CPU: left/right 0.50, all 80 answered "right"; held out 0.497
    / 0.042 / 0.792. Four layers, 262 s CPU: left/right 0.50, all 80 "right"; held out 0.468 / 0.008 /
    0.775. Neither is near 0.70, so the shipped model stays, and twice the width or depth does not teach
    left from right either.

    POVID with an SFT term on the chosen side (``TrainConfig.sft_weight``) was not needed to make it help
    and was not run.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEMO_LR",
    "EVAL_SEED",
    "MODEL_DIR",
    "N_EVAL",
    "build_toy_vlm",
    "control_stic_sft_only",
    "demo_povid",
    "demo_scl",
    "demo_stic",
    "eval_scenes",
    "evaluate_vlm",
    "load_toy_vlm",
    "make_toy_llava",
    "make_toy_tokenizer",
    "toy_hallucination_rewrite",
]

#: where the shipped model lives (committed; rebuilt by :func:`load_toy_vlm` when missing)
MODEL_DIR = Path(__file__).resolve().parents[1] / "toy_models" / "vlm"
IMAGE_SIZE = 32
PATCH_SIZE = 4
HIDDEN = 64
LAYERS = 2
#: the description prompt of the evaluation
DESCRIBE = "Describe the image."
#: held-out scenes per kind in the evaluation set, and their seed
N_EVAL = 40
EVAL_SEED = 12345
#: pool scenes per kind and split for each method (images the method may use; not the evaluation's)
N_POOL = 24
#: SFT of the base model: steps, batch, learning rate, train scenes per kind
SFT_STEPS = 2000
SFT_BATCH = 16
SFT_LR = 1e-3
SFT_WARMUP = 100
SFT_SCENES = 400
#: questions per pair scene in the SFT data (other scenes: 2)
SFT_PAIR_QUESTIONS = 4
#: full fine-tuning learning rate of each method's preference training (see the module docstring)
#: SCL samples both turns at this temperature (SCL: greedy), so that one-word answers can differ
SCL_TEMPERATURE = 0.7
#: (``stic_sft``: STIC's stage 3, lr 2e-5 in the paper, at the same full fine-tuning rate)
DEMO_LR: dict[str, float] = {"stic": 2e-4, "stic_sft": 2e-4, "povid": 2e-4, "scl": 2e-4}
#: tokens per STIC description (stage 1's pairs and stage 3's descriptions; a toy caption is <= 12)
STIC_MAX_NEW_TOKENS = 24


# ------------------------------------------------------------------------------------------ model


def _corpus_words() -> list[str]:
    """Words that become single tokens: the toy world's and those of the prompts the methods use."""
    from mmalign import prompts as P
    from mmalign import toyworld as W

    texts = [P.STIC_DESCRIBE_PROMPT, *P.STIC_HALLUCINATION_PROMPTS, *P.DESCRIBE_PROMPTS, P.POVID_INJECTION_TEMPLATE,
             *P.SELF_CORRECTION_REVIEW_PROMPTS, P.SCL_STEP_BY_STEP, P.SCL_ANSWER_FORMAT,
             " ".join(W.COLOURS), " ".join(W.SHAPES),
             "squares circles triangles zero one two three objects object left right of to the a an what colour "
             "shape how many is are there on or"]
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"[A-Za-z]+", text):
            seen.setdefault(word, None)
    return list(seen)


def make_toy_tokenizer() -> Any:
    """A byte-level BPE whose merges make every toy-world word and prompt word one token (``" red"``,
    ``" circle"``, ``"Describe"``); special tokens and chat template of the tiny LLaVA
    (:func:`mmalign.tiny.make_tiny_tokenizer`), so any other text still tokenizes, byte by byte."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from mmalign.tiny import make_tiny_tokenizer
    from mmalign.utils import byte_alphabet

    byte_table = byte_alphabet()
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    words = _corpus_words()
    # space-prefixed words first, so " red" in a sentence is one token
    for variant in [" " + w for w in words] + words:
        symbols = [byte_table[b] for b in variant.encode("utf-8")]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
    vocab_list = list(byte_table)
    known = set(vocab_list)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            vocab_list.append(a + b)
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(vocab_list)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    backend.add_special_tokens([*specials.values(), "<image>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=make_tiny_tokenizer(flavour="llava").chat_template,
        padding_side="left", model_max_length=2048, extra_special_tokens=["<image>"], **specials)


def make_toy_llava(out_dir: str | Path, *, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """An untrained LLaVA for the toy world, saved to ``out_dir`` (loads with ``from_pretrained``).

    CLIP tower: 32 px images, patch 4 -> 64 patch tokens (CLS dropped); Llama text model; ``hidden``
    width and ``layers`` layers in both, 4 heads; :func:`make_toy_tokenizer`.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mmalign.utils import seeded

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"toy VLM output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tok = make_toy_tokenizer()
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    with seeded(seed):
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _pil(scene: Any) -> Any:
    from PIL import Image

    from mmalign import toyworld as W

    return Image.fromarray(W.render(scene, IMAGE_SIZE))


def _sft_records(scenes: Sequence[Any], rng: random.Random) -> list[tuple[int, str, str]]:
    """``(scene index, prompt or chat, target)`` of the base model's SFT (see the module docstring)."""
    from mmalign import prompts as P
    from mmalign import toyworld as W
    from vision.scl import review_conversation

    describe = [*P.DESCRIBE_PROMPTS, P.STIC_DESCRIBE_PROMPT]
    records: list[tuple[int, str, str]] = []
    for i, scene in enumerate(scenes):
        records.append((i, rng.choice(describe), scene.caption()))
        questions = scene.questions()
        # a pair has 11 questions and needs left/right binding: it gets more of them
        for q, a in rng.sample(questions, min(SFT_PAIR_QUESTIONS if scene.kind == "pair" else 2, len(questions))):
            records.append((i, q, a))
        u = rng.random()
        if u < 0.1:  # asked to imagine, it names a made-up scene
            made_up = W.sample_scene(rng.randrange(2**31), scene.kind)
            records.append((i, rng.choice(P.STIC_HALLUCINATION_PROMPTS), made_up.caption()))
        elif u < 0.3:  # SCL's two turns: the first answer right or wrong, the second the true one
            q, a = rng.choice(questions)
            if rng.random() < 0.5:
                records.append((i, P.scl_question(q), a))
            else:
                first = a if rng.random() < 0.6 else _swap_word(a, rng)
                review = review_conversation(q, first, rng)[2]["content"][0]["text"]
                # the two-turn chat as one prompt string: the chat template renders it to the same text
                records.append((i, f"{P.scl_question(q)} ASSISTANT: {first}</s> USER: {review}", a))
    return records


def _tensorise(processor: Any, scenes: Sequence[Any],
               records: Sequence[tuple[int, str, str]]) -> tuple[torch.Tensor, list[tuple[int, list[int], list[int]]]]:
    """Each scene's ``pixel_values`` (computed once) and each record as ``(scene index, prompt ids, response
    ids)``: the prompt rendered as the adapter renders it (:func:`vision.adapter.render_prompt`, image
    tokens expanded by the processor), the response followed by EOS, as the engine's SFT trains it."""
    from vision.adapter import render_prompt

    tok = processor.tokenizer
    images = [_pil(s) for s in scenes]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    prompt_ids: dict[str, list[int]] = {}
    rows = []
    for i, prompt, target in records:
        text = render_prompt(processor, prompt, 1)
        if text not in prompt_ids:  # the expansion of the image slot does not depend on the image
            ids = processor(text=[text], images=[[images[i]]], return_tensors="pt")["input_ids"][0]
            prompt_ids[text] = ids.tolist()
        rows.append((i, prompt_ids[text], [*tok(target, add_special_tokens=False)["input_ids"], tok.eos_token_id]))
    return pixel_values, rows


def _length_batches(rows: Sequence[tuple[int, list[int], list[int]]], batch: int,
                    generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: a random order, cut in chunks of 64 batches, each chunk sorted by length
    (little padding), the batches shuffled."""
    perm = torch.randperm(len(rows), generator=generator).tolist()
    chunk = 64 * batch
    batches = []
    for k in range(0, len(perm), chunk):
        part = sorted(perm[k : k + chunk], key=lambda j: len(rows[j][1]) + len(rows[j][2]))
        batches += [part[b : b + batch] for b in range(0, len(part), batch)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


def _sft_loss(model: Any, rows: Sequence[tuple[int, list[int], list[int]]], pixel_values: torch.Tensor,
              index: Sequence[int], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL of the responses of the rows ``index`` (right-padded; the causal mask alone
    keeps the padding out of every real position, so no attention mask is needed). The LM head runs on
    the response positions only: on the toy, the vocabulary projection of every position costs more
    than the rest of the model."""
    width = max(len(rows[j][1]) + len(rows[j][2]) for j in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    labels = torch.full((len(index), width), -100, dtype=torch.long)
    for b, j in enumerate(index):
        _, prompt, response = rows[j]
        ids[b, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        labels[b, len(prompt) : len(prompt) + len(response)] = torch.tensor(response)
    images = pixel_values[torch.tensor([rows[j][0] for j in index])]
    hidden = model.model(input_ids=ids, pixel_values=images).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), target[keep])


def build_toy_vlm(out_dir: str | Path, *, seed: int = 0, progress: bool = True, steps: int = SFT_STEPS,
                  n_scenes: int = SFT_SCENES) -> Path:
    """Train the toy VLM from random init by SFT and save it to ``out_dir``; returns it.

    ``steps`` optimizer steps of ``SFT_BATCH`` examples over ``n_scenes`` train-split scenes per kind
    (see the module docstring). A plain PyTorch loop on tensors made once (:func:`_tensorise`): the
    same rows and loss as the engine's ``loss="sft"`` through the VLM adapter (prompt rendered by the
    chat template, response + EOS, mean token NLL), without re-reading and re-processing every image
    at every step. AdamW, linear warmup then cosine decay, gradients clipped to norm 1. Deterministic
    on one thread; the work folder next to ``out_dir`` is removed at the end.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign import toyworld as W
    from mmalign.utils import seeded

    out = Path(out_dir)
    work = out.parent / f".{out.name}-build"
    shutil.rmtree(work, ignore_errors=True)
    try:
        base = make_toy_llava(work / "init", seed=seed)
        model = AutoModelForImageTextToText.from_pretrained(base, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(base)
        scenes = [s for k in W.KINDS for s in W.scenes(n_scenes, "train", k, seed=seed)]
        pixel_values, rows = _tensorise(processor, scenes, _sft_records(scenes, random.Random(seed)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, betas=(0.9, 0.99), weight_decay=0.0)
        warmup = max(1, min(SFT_WARMUP, steps // 10))

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + np.cos(np.pi * step / steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        generator = torch.Generator().manual_seed(seed)
        pad_id = int(processor.tokenizer.pad_token_id)
        batches: list[list[int]] = []
        losses: list[float] = []
        model.train()
        with seeded(seed):
            for step in range(steps):
                if not batches:
                    batches = _length_batches(rows, SFT_BATCH, generator)
                loss = _sft_loss(model, rows, pixel_values, batches.pop(), pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if progress and ((step + 1) % 250 == 0 or step + 1 == steps):
                    print(f"toy VLM SFT step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}", flush=True)
        model.eval()
        tmp = out.parent / f".{out.name}-new"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "build.json").write_text(json.dumps(
            {"seed": seed, "steps": steps, "batch_size": SFT_BATCH, "learning_rate": SFT_LR, "warmup_steps": warmup,
             "scenes_per_kind": n_scenes, "examples": len(rows),
             "final_loss": float(np.mean(losses[-50:])) if losses else None}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_toy_vlm(path: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of the toy VLM at ``path`` (default :data:`MODEL_DIR`, built there when missing)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(path) if path is not None else MODEL_DIR
    if path is None and not (folder / "model.safetensors").is_file():
        build_toy_vlm(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no toy VLM at {folder} (model.safetensors missing); build it with build_toy_vlm")
    model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True).eval()
    return model, AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------ text rule (POVID)

def _word_classes() -> tuple[tuple[str, ...], ...]:
    from mmalign import toyworld as W

    return (tuple(W.COLOURS), tuple(W.SHAPES), tuple(f"{s}s" for s in W.SHAPES), ("one", "two", "three"),
            ("left", "right"))


def _swap_word(text: str, rng: random.Random) -> str:
    """``text`` with one world word (a colour, shape, number or side) replaced by another of its kind,
    chosen with ``rng``; ``text`` unchanged when it has none."""
    classes = _word_classes()
    words = text.split(" ")
    spots = [(i, c) for i, w in enumerate(words) for c in classes if w.strip(".,?!").lower() in c]
    if not spots:
        return text
    i, cls = rng.choice(spots)
    word = words[i].strip(".,?!").lower()
    words[i] = words[i].lower().replace(word, rng.choice([w for w in cls if w != word]))
    return " ".join(words)


def toy_hallucination_rewrite(rewriter: Any, tokenizer: Any, prompts: Sequence[str], settings: Any = None, *,
                              seeds: Sequence[int] | None = None) -> list[str]:
    """POVID's hallucination injection in the toy world, with a rule as the rewriter.

    A ``text_fn`` for :func:`vision.povid.inject_hallucinations` (``generate_text``'s signature; the
    model and tokenizer are unused): reads the correct answer back from each
    :func:`mmalign.prompts.hallucination_injection_prompt` and swaps one colour, shape, number or side
    in it for another of its kind (an attribute or relation hallucination), seeded per record.
    """
    out = []
    for k, prompt in enumerate(prompts):
        match = re.search(r"Correct answer: (.*)\nRewritten answer:", prompt, flags=re.S)
        if match is None:
            raise ValueError(f"prompt {k} is not a hallucination-injection prompt: {prompt[:80]!r}")
        out.append(_swap_word(match.group(1).strip(), random.Random(seeds[k] if seeds is not None else k)))
    return out


# ------------------------------------------------------------------------------------ evaluation


def eval_scenes(n_per_kind: int = N_EVAL) -> list[Any]:
    """The fixed held-out evaluation scenes: ``n_per_kind`` of each kind, held-out split, seed ``EVAL_SEED``."""
    from mmalign import toyworld as W

    return [s for k in W.KINDS for s in W.scenes(n_per_kind, "held_out", k, seed=EVAL_SEED)]


def evaluate_vlm(model: Any, processor: Any, scenes: Sequence[Any], *, batch_size: int = 64) -> dict[str, Any]:
    """Greedy descriptions and answers on ``scenes``; the metrics as per-item 0/1 arrays (see the module
    docstring): ``answer`` (one per question), ``description`` and ``hallucination`` (one per scene),
    with the texts (``descriptions``, ``answers``)."""
    from mmalign import toyworld as W
    from vision.generate import GenerationSettings, generate_responses

    greedy = GenerationSettings(max_new_tokens=16, temperature=0.0, batch_size=batch_size)
    images = [_pil(s) for s in scenes]
    descs = [d.strip() for d in generate_responses(model, processor, [DESCRIBE] * len(scenes),
                                                   [[im] for im in images], greedy)]
    qs = [(i, q) for i, s in enumerate(scenes) for q, _ in s.questions()]
    answers = [a.strip() for a in generate_responses(model, processor, [q for _, q in qs],
                                                     [[images[i]] for i, _ in qs], greedy)]
    facts = [W.caption_facts(d, s) for d, s in zip(descs, scenes, strict=True)]
    return {
        "answer": np.array([W.answer_correct(q, a, scenes[i]) for (i, q), a in zip(qs, answers, strict=True)], float),
        "description": np.array([f["colour"] and f["shape"] and f["count"] and not f["hallucinated"] for f in facts],
                                float),
        "hallucination": np.array([f["hallucinated"] for f in facts], float),
        "descriptions": descs,
        "answers": answers,
    }


_METRICS = (("answer", "answer accuracy", ""), ("description", "description accuracy", ""),
            ("hallucination", "hallucination rate", "lower is better"))


def _rows(method: str, before: dict[str, Any], after: dict[str, Any], note: str, seed: int) -> list[Any]:
    from mmalign.report import DemoRow, paired_bootstrap

    rows = []
    for key, metric, extra in _METRICS:
        _, lo, hi = paired_bootstrap(before[key], after[key], seed=seed)
        rows.append(DemoRow(method=method, metric=metric, before=float(before[key].mean()),
                            after=float(after[key].mean()), lo=lo, hi=hi, n=int(before[key].size),
                            note="; ".join(x for x in (extra, note) if x)))
    return rows


def _finish(method: str, out: Path, scenes: Sequence[Any], before: dict[str, Any], after: dict[str, Any],
            note: str, seed: int, extra: dict[str, Any], first: Sequence[Any] = ()) -> list[Any]:
    """Rows (``first``, then ``method``'s), the before/after sheet (descriptions of the first 8 scenes of
    each kind) and rows.json."""
    from mmalign.files import atomic_write_bytes
    from mmalign.report import save_grid, save_rows

    rows = [*first, *_rows(method, before, after, note, seed)]
    n = len(scenes) // 3
    pick = [k * n + j for k in range(3) for j in range(min(8, n))]
    images, labels = [], []
    for block in range(0, len(pick), 8):
        for tag, res in (("before", before), ("after", after)):
            for i in pick[block : block + 8]:
                images.append(_pil(scenes[i]))
                labels.append(f"{tag}: {res['descriptions'][i]}")
    save_grid(images, labels, out / "before_after.png", ncol=8, scale=4)
    save_rows(rows, out / "rows.json")
    detail = {"truth": [s.caption() for s in scenes], "before": before["descriptions"],
              "after": after["descriptions"], **extra}
    atomic_write_bytes(out / "details.json", json.dumps(detail, indent=1).encode())
    return rows


# ----------------------------------------------------------------------------------------- demos


def _pool(n_per_kind: int, seed: int) -> list[Any]:
    """The images a method may use: ``n_per_kind`` scenes of each kind and split (seed ``seed + 1``; the
    evaluation's seed is ``EVAL_SEED``, so no evaluation image is among them)."""
    from mmalign import toyworld as W

    return [s for split in ("train", "held_out") for k in W.KINDS for s in W.scenes(n_per_kind, split, k, seed=seed + 1)]


def _start(method: str, out: str | Path, model_path: str | Path | None, n_eval: int) -> tuple[Path, Path, Any, Any,
                                                                                              list[Any], dict[str, Any]]:
    """Fresh ``out/<method>``, the toy model, the evaluation scenes and the BEFORE measures."""
    torch.set_num_threads(1)
    folder = Path(out) / method
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = Path(model_path) if model_path is not None else MODEL_DIR
    model, processor = load_toy_vlm(model_path)
    scenes = eval_scenes(n_eval)
    return folder, path, model, processor, scenes, evaluate_vlm(model, processor, scenes)


def _train_kwargs(progress: bool, seed: int, steps: int | None) -> dict[str, Any]:
    """Engine settings every demo shares; ``steps`` (tests) caps the optimizer steps, else epochs decide."""
    return {"trackers": [], "progress": progress, "seed": seed, "max_steps": steps or 0, "overwrite_output_dir": True}


def _stic_instructions(pool: Sequence[Any], image_dir: Path) -> list[Any]:
    """STIC stage 3's instruction data in the toy world: every question of every pool scene with its
    ground-truth answer, as pairs whose ``chosen`` is the answer, on the pool image ``p<i>.png`` of
    ``image_dir`` (``rejected`` is ignored by :func:`vision.stic.build_description_infused_set`)."""
    from mmalign.pairs import PreferencePair

    return [PreferencePair(id=f"p{i:04d}-q{j:02d}", prompt=q, chosen=a, rejected="", chosen_media=[f"p{i:04d}.png"],
                           rejected_media=[f"p{i:04d}.png"]).with_root(image_dir)
            for i, scene in enumerate(pool) for j, (q, a) in enumerate(scene.questions())]


def _stic_descriptions(model: Any, processor: Any, image_dir: Path, n_images: int, seed: int) -> dict[str, str]:
    """STIC stage 3's descriptions: the (stage-2) model describes each pool image ``p<i>.png`` under a
    describe prompt drawn per image (official STIC, ``stic/generate_des_stage2.py`` at yihedeng9/STIC
    @6264844, draws one of eight describe prompts per image and samples at temperature 0.2; the toy
    draws from the describe prompts it was trained on)."""
    from mmalign.pairs import load_image
    from mmalign.prompts import DESCRIBE_PROMPTS
    from vision.generate import GenerationSettings, generate_responses, record_seed

    names = [f"p{i:04d}.png" for i in range(n_images)]
    prompts = [random.Random(record_seed(seed, name, "stage3-prompt")).choice(DESCRIBE_PROMPTS) for name in names]
    images = [[load_image(image_dir / name)] for name in names]
    texts = generate_responses(model, processor, prompts, images, GenerationSettings(
        max_new_tokens=STIC_MAX_NEW_TOKENS, temperature=0.2, batch_size=64, seed=seed),
        seeds=[record_seed(seed, name, "stage3-description") for name in names])
    return dict(zip(names, (t.strip() for t in texts), strict=True))


def _stic_sft(model: Any, processor: Any, sft_dir: Path, output_dir: Path, progress: bool, seed: int,
              steps: int | None) -> Any:
    """STIC stage 3's SFT of ``model`` on the description-infused set ``sft_dir``: STIC's recipe
    (:func:`vision.stic.stic_sft_config`: mean token NLL of the answer, cosine, 3% warmup, 1 epoch, 32
    per step) with the demo's full fine-tuning rate ``DEMO_LR["stic_sft"]``; the engine's result."""
    from mmalign.pairs import PairDataset
    from vision.stic import stic_sft_config, train_description_infused

    n = len(PairDataset(sft_dir))
    config = stic_sft_config(n, output_dir=str(output_dir), learning_rate=DEMO_LR["stic_sft"], lora_r=0,
                             batch_size=min(32, n), **_train_kwargs(progress, seed, steps))
    return train_description_infused(model, processor, sft_dir, config)


def demo_stic(out: str | Path, *, seed: int = 0, progress: bool = True, steps: int | None = None,
              n_pool: int = N_POOL, n_eval: int = N_EVAL, model_path: str | Path | None = None) -> list[Any]:
    """STIC's three stages on the toy VLM: stage 1 pairs from the unlabelled pool images, stage 2 DPO,
    stage 3 SFT on the pool's questions with the stage-2 model's own descriptions prepended.

    Rows for ``out/stic``: ``"STIC stage 2"`` (stages 1-2, measured before stage 3) then ``"STIC"``
    (the whole recipe); the infused set stays in ``out/stic/sft`` (:func:`control_stic_sft_only`
    trains the base model on it).
    """
    from mmalign import toyworld as W
    from mmalign.pairs import read_pairs
    from vision.stic import (
        STICConfig,
        build_description_infused_set,
        build_stic_pairs,
        stic_dpo_config,
        train_stic_dpo,
    )

    t0 = time.process_time()
    folder, _, model, processor, scenes, before = _start("stic", out, model_path, n_eval)
    image_dir = folder / "images"
    image_dir.mkdir()
    pool = _pool(n_pool, seed)
    truth = {}
    for i, scene in enumerate(pool):
        _pil(scene).save(image_dir / f"p{i:04d}.png")
        truth[f"stic/p{i:04d}.png"] = scene
    report = build_stic_pairs(model, processor, STICConfig(
        image_dir=str(image_dir), out_dir=str(folder / "pairs"), max_new_tokens=STIC_MAX_NEW_TOKENS,
        temperature=0.2, batch_size=64, seed=seed, lowres_size=8), rank=0, world_size=1)
    pairs = read_pairs(folder / "pairs") if (folder / "pairs" / "pairs.jsonl").is_file() else []
    config = stic_dpo_config(max(1, len(pairs)), output_dir=str(folder / "train"), learning_rate=DEMO_LR["stic"],
                             lora_r=0, batch_size=min(8, max(1, len(pairs))), **_train_kwargs(progress, seed, steps))
    n_steps = 0
    stage2_model, stage2 = model, before
    if pairs:
        result = train_stic_dpo(model, processor, folder / "pairs", config)
        stage2_model, n_steps = result.model, result.global_step
        stage2 = evaluate_vlm(stage2_model, processor, scenes)
    t2 = time.process_time() - t0
    # stage 3: the stage-2 model describes the pool images; its descriptions go before the pool's questions
    descriptions = _stic_descriptions(stage2_model, processor, image_dir, len(pool), seed)
    n_sft, sft_skipped = build_description_infused_set(_stic_instructions(pool, image_dir), descriptions,
                                                       folder / "sft")
    sft = _stic_sft(stage2_model, processor, folder / "sft", folder / "train_sft", progress, seed, steps)
    after = evaluate_vlm(sft.model, processor, scenes)

    chosen_ok = [not W.caption_facts(p.chosen, truth[p.id])["hallucinated"] for p in pairs]
    rejected_bad = [W.caption_facts(p.rejected, truth[p.id])["hallucinated"] for p in pairs]
    infused_ok = [not W.caption_facts(descriptions[f"p{i:04d}.png"], s)["hallucinated"] for i, s in enumerate(pool)]
    stats = {"pairs": len(pairs), "skipped": {k: len(v) for k, v in report.skipped.items()},
             "chosen_not_hallucinated": float(np.mean(chosen_ok)) if pairs else 0.0,
             "rejected_hallucinated": float(np.mean(rejected_bad)) if pairs else 0.0,
             "steps": n_steps, "sft_records": n_sft, "sft_skipped": sft_skipped, "sft_steps": sft.global_step,
             "descriptions_not_hallucinated": float(np.mean(infused_ok)),
             "cpu_seconds_stage2": t2, "cpu_seconds": time.process_time() - t0}
    note2 = (f"stages 1-2: {len(pairs)} pairs from {len(truth)} unlabelled images, {n_steps} DPO steps, "
             f"full fine-tuning lr {config.learning_rate:g}")
    note = (f"whole recipe: stage 2, then {sft.global_step} SFT steps on {n_sft} description-infused pool "
            f"questions, lr {DEMO_LR['stic_sft']:g}")
    return _finish("STIC", folder, scenes, before, after, note, seed,
                   {"stats": stats, "stage2": stage2["descriptions"], "stage3_descriptions": descriptions,
                    "after_items": {k: after[k].tolist() for k, _, _ in _METRICS}},
                   first=_rows("STIC stage 2", before, stage2, note2, seed))


def control_stic_sft_only(out: str | Path, *, seed: int = 0, progress: bool = True, steps: int | None = None,
                          n_eval: int = N_EVAL, model_path: str | Path | None = None) -> list[Any]:
    """The control of STIC's stage 3 (not part of the demo): the *base* model fine-tuned on the very
    description-infused set :func:`demo_stic` wrote to ``out/stic/sft`` (the same records, recipe and
    steps), without stage 2's DPO; rows ``"STIC stage 3 alone"`` for ``out/stic_sft_only``, then rows
    ``"STIC vs stage 3 alone"``: the whole recipe's items (``out/stic/details.json``) against this
    control's, paired, so their change is what the DPO stage adds."""
    from mmalign.report import save_rows

    sft_dir = Path(out) / "stic" / "sft"
    details = Path(out) / "stic" / "details.json"
    if not (sft_dir / "pairs.jsonl").is_file() or not details.is_file():
        raise FileNotFoundError(f"no description-infused set at {sft_dir}: run demo_stic with the same out first")
    whole = {k: np.array(v, float) for k, v in json.loads(details.read_text())["after_items"].items()}
    t0 = time.process_time()
    folder, _, model, processor, scenes, before = _start("stic_sft_only", out, model_path, n_eval)
    sft = _stic_sft(model, processor, sft_dir, folder / "train_sft", progress, seed, steps)
    after = evaluate_vlm(sft.model, processor, scenes)
    stats = {"sft_steps": sft.global_step, "cpu_seconds": time.process_time() - t0}
    note = f"control: {sft.global_step} SFT steps on STIC's description-infused set, no DPO before"
    rows = _finish("STIC stage 3 alone", folder, scenes, before, after, note, seed, {"stats": stats})
    rows += _rows("STIC vs stage 3 alone", after, whole, "before: stage 3 alone; after: the whole recipe", seed)
    save_rows(rows, folder / "rows.json")
    return rows


def demo_povid(out: str | Path, *, seed: int = 0, progress: bool = True, steps: int | None = None,
               n_pool: int = N_POOL, n_eval: int = N_EVAL, model_path: str | Path | None = None) -> list[Any]:
    """POVID on the toy VLM (rule-injected text negatives + online noisy-image negatives, the two-stage
    recipe); rows for ``out/povid``."""
    from mmalign.engine import TrainConfig
    from vision.povid import POVIDPairsConfig, POVIDRecipeConfig, build_povid_pairs, run_povid_recipe
    from vision.records import ImageQA

    t0 = time.process_time()
    folder, path, model, processor, scenes, before = _start("povid", out, model_path, n_eval)
    rng = random.Random(seed)
    records = []
    for i, scene in enumerate(_pool(n_pool, seed)):
        image = _pil(scene)
        records.append(ImageQA(id=f"p{i:04d}-describe", image=image, question=DESCRIBE, answer=scene.caption()))
        q, a = rng.choice(scene.questions())
        records.append(ImageQA(id=f"p{i:04d}-question", image=image, question=q, answer=a))
    report = build_povid_pairs(model, processor, POVIDPairsConfig(
        out_dir=str(folder / "pairs"), batch_size=64, max_new_tokens=16, seed=seed, progress=progress),
        records=records, rewrite_fn=toy_hallucination_rewrite, rank=0, world_size=1)
    lr = DEMO_LR["povid"]

    def stage(name: str, epochs: int) -> TrainConfig:
        return TrainConfig(output_dir=str(folder / "train" / name), loss="dpo", loss_kwargs={"beta": 0.1},
                           learning_rate=lr, lr_scheduler="cosine", batch_size=8, num_epochs=epochs,
                           **_train_kwargs(progress, seed, steps))

    stage1, stage2 = run_povid_recipe(POVIDRecipeConfig(
        model=str(path), data=str(folder / "pairs"), output_dir=str(folder / "train"),
        stage1=stage("stage1", 3), stage2=stage("stage2", 1)))
    shutil.rmtree(folder / "train" / "stage1_merged", ignore_errors=True)
    after = evaluate_vlm(stage2.model, processor, scenes)
    stats = {"pairs": dict(report.counts), "skipped": {k: len(v) for k, v in report.skipped.items()},
             "steps": [stage1.global_step, stage2.global_step], "cpu_seconds": time.process_time() - t0}
    note = (f"{sum(report.counts.values())} pairs from {len(records)} labelled records, "
            f"{stage1.global_step}+{stage2.global_step} DPO steps, full fine-tuning lr {lr:g}")
    return _finish("POVID", folder, scenes, before, after, note, seed, {"stats": stats})


def demo_scl(out: str | Path, *, seed: int = 0, progress: bool = True, steps: int | None = None,
             n_pool: int = N_POOL, n_eval: int = N_EVAL, model_path: str | Path | None = None) -> list[Any]:
    """SCL on the toy VLM (two-turn answers on pool questions, the flips as pairs, DPO + 0.1 SFT);
    rows for ``out/scl``."""
    from mmalign import toyworld as W
    from mmalign.engine import TrainConfig
    from mmalign.pairs import read_pairs
    from vision.records import ImageQA
    from vision.scl import SCLPairsConfig, build_scl_pairs
    from vision.train import VLMTrainConfig, run

    t0 = time.process_time()
    folder, path, model, processor, scenes, before = _start("scl", out, model_path, n_eval)
    rng = random.Random(seed)
    records, by_id = [], {}
    for i, scene in enumerate(_pool(n_pool, seed)):
        image = _pil(scene)
        for j, (q, a) in enumerate(rng.sample(scene.questions(), 2)):
            rec = ImageQA(id=f"p{i:04d}-{j}", image=image, question=q, answer=a)
            records.append(rec)
            by_id[rec.id] = scene

    def checker(record: Any, response: str) -> bool:
        return W.answer_correct(record.question, response, by_id[record.id])

    report = build_scl_pairs(model, processor, SCLPairsConfig(
        out_dir=str(folder / "pairs"), batch_size=64, max_new_tokens=16, temperature=SCL_TEMPERATURE, seed=seed,
        progress=progress), records=records, checker=checker, rank=0, world_size=1)
    n_pairs = len(read_pairs(folder / "pairs")) if (folder / "pairs" / "pairs.jsonl").is_file() else 0
    lr = DEMO_LR["scl"]
    if n_pairs:
        result = run(VLMTrainConfig(model=str(path), data=str(folder / "pairs"), warmup_ratio=0.03, train=TrainConfig(
            output_dir=str(folder / "train"), loss="dpo", loss_kwargs={"beta": 0.1}, sft_weight=0.1, learning_rate=lr,
            lr_scheduler="cosine", batch_size=min(8, n_pairs), num_epochs=3, **_train_kwargs(progress, seed, steps))))
        after, n_steps = evaluate_vlm(result.model, processor, scenes), result.global_step
    else:
        after, n_steps = before, 0
    stats = {"outcomes": dict(report.counts), "pairs": n_pairs, "steps": n_steps,
             "cpu_seconds": time.process_time() - t0}
    note = (f"{n_pairs} pairs (flips) from {len(records)} two-turn answers, {n_steps} DPO+SFT steps, "
            f"full fine-tuning lr {lr:g}")
    return _finish("SCL", folder, scenes, before, after, note, seed, {"stats": stats})
