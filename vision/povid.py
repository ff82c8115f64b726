"""POVID: hallucination-injected text negatives and diffusion-noise image negatives (Zhou et al. 2024).

Two pair sets over the same (image, question, answer) records, written into one dataset:

* **text** (``id = "<record id>/text"``): chosen = the ground-truth answer, rejected = the answer
  rewritten by a local language model (any causal LM, or a VLM used text-only; a parameter, no web
  API) with :func:`mmalign.prompts.hallucination_injection_prompt`;
* **image** (``id = "<record id>/image"``): chosen = the ground-truth answer, rejected = what the
  policy says when it looks at the noised image (``mmalign.corruptions.povid_noise``, t = 500, on
  the ``[0, 1]`` image as POVID does). The noisy image is saved in the dataset and recorded in
  ``meta["povid"]["corruption"]`` (parameters, seed, ``media``). Two forms (``image_negatives``):

  - ``"online"`` (default, the official form; YiyangZhou/POVID @92c7c67 ``tool/dpo_trainer_inherent.py``):
    nothing is generated before training. On every step the model reads the chosen answer with the
    noisy image, takes its top (argmax) token at each answer position, and those tokens are scored
    with the clean-image logits, separately for the policy and the reference (each with its own
    logits). The pair has an empty rejected text and ``meta["online_negative"]``
    (:func:`vision.adapter.online_negative`); :class:`vision.adapter.VLMAdapter` does the rest, so the
    engine is unchanged. POVID draws fresh noise in every ``__getitem__``; we draw it once per record
    (seeded by the record id), which is the same over POVID's single image-negative epoch.
  - ``"offline"``: the policy generates a full answer on the noisy image once, before training
    (greedy by default), and that text is the rejected response, scored on the clean image
    (:func:`mmalign.corruptions.hacked_negative`; ``score_rejected_on="corrupted"`` is the ablation).
    A cheaper, fixed negative; not the paper's method.

Combined objective. POVID optimises ``0.5 * DPO(chosen, image negative) + 0.5 * DPO(chosen,
hallucinated text)`` per record. The engine multiplies each pair's loss by ``batch["weight"]``
(from ``pair.meta["weight"]``) and averages over pairs, so every pair gets
``weight = 2 * w_kind``: over a dataset holding both pairs of every record, the mean is
``(1/2N) * sum_r 2 * (w_text * l_text + w_image * l_image) = w_text * mean(l_text) + w_image * mean(l_image)``,
POVID's objective exactly for the default ``w_text = w_image = 0.5``.

The official two-stage recipe (:class:`POVIDRecipeConfig`, :func:`run_povid_recipe`, the YAML
``scripts/configs/llava15_povid_recipe.yaml``; ``python -m vision.povid --config ...``): stage 1 is
plain DPO on the text pairs for 3 epochs (``scripts/run_dpo.sh``), its LoRA merged into the weights;
stage 2 trains the merged model (also the new reference) on both sets with the 0.5/0.5 objective for
1 epoch (``scripts/run_povid.sh``). Both: beta 0.1, LoRA r128/alpha 256, lr 1e-7, cosine, 3% warmup.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import help_
from mmalign.engine import TrainConfig
from mmalign.prompts import hallucination_injection_prompt
from vision.generate import GenerationSettings, generate_responses, generate_text, record_seed

__all__ = [
    "IMAGE_NEGATIVES",
    "POVIDRecipeConfig",
    "POVIDRecord",
    "POVIDReport",
    "build_povid_pairs",
    "inject_hallucinations",
    "main",
    "run_povid_recipe",
]

#: ``build_povid_pairs(image_negatives=...)``: ``"online"`` (official, default) or ``"offline"``.
IMAGE_NEGATIVES: tuple[str, str] = ("online", "offline")


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
    image_negatives: str = "online",
    score_rejected_on: str = "clean",
    settings: GenerationSettings | None = None,
    seed: int = 0,
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> POVIDReport:
    """Write POVID's two pair sets for ``records`` into ``out_dir`` (see the module docstring).

    ``rewriter=None`` uses the policy itself (text only, through ``processor``) to inject
    hallucinations. ``text_weight``/``image_weight``: weights of the two DPO terms (0 drops that set).
    ``image_negatives``: ``"online"`` (official: built each training step) or ``"offline"`` (a greedy
    answer on the noisy image, generated here). ``score_rejected_on`` applies to ``"offline"`` only.
    The noise of record ``r`` is drawn from ``torch.Generator().manual_seed(record_seed(seed, r.id))``.
    """
    from mmalign.corruptions import describe, hacked_negative, pil_to_tensor, povid_noise, tensor_to_pil
    from mmalign.pairs import PairWriter, PreferencePair, load_image
    from vision.adapter import ONLINE_NEGATIVE, online_negative

    if text_weight < 0 or image_weight < 0 or text_weight + image_weight == 0:
        raise ValueError(f"POVID weights must be >= 0 and not both 0, got {text_weight}, {image_weight}")
    if image_negatives not in IMAGE_NEGATIVES:
        raise ValueError(f"image_negatives must be one of {IMAGE_NEGATIVES}, got {image_negatives!r}")
    if image_negatives == "online" and score_rejected_on != "clean":
        raise ValueError("online image negatives are always scored with the clean-image logits (as POVID)")
    settings = settings or GenerationSettings(max_new_tokens=128, temperature=0.0)
    report = POVIDReport()
    images = [rec.image if not isinstance(rec.image, (str, Path)) else load_image(rec.image) for rec in records]
    hallucinated: list[str] = []
    if text_weight > 0:
        model = rewriter if rewriter is not None else policy
        tok = rewriter_tokenizer if rewriter is not None else processor
        if tok is None:
            raise ValueError("build_povid_pairs: pass rewriter_tokenizer with rewriter")
        hallucinated = inject_hallucinations(model, tok, [r.answer for r in records], [r.question for r in records],
                                             settings)
    noisy: list[Any] = []
    noise_seeds = [record_seed(seed, rec.id, "povid_noise") for rec in records]
    noisy_answers: list[str] = []
    if image_weight > 0:
        for img, noise_seed in zip(images, noise_seeds, strict=True):
            generator = torch.Generator().manual_seed(noise_seed)
            noisy.append(tensor_to_pil(povid_noise(pil_to_tensor(img), t=noise_step, generator=generator)))
        if image_negatives == "offline":
            noisy_answers = [a.strip() for a in generate_fn(
                policy, processor, [r.question for r in records], [[n] for n in noisy], settings,
                seeds=[record_seed(seed, r.id, "image") for r in records],
            )]
    with PairWriter(out_dir) as writer:
        for i, rec in enumerate(records):
            clean_rel = writer.add_media(images[i].convert("RGB"), f"media/{rec.id}.png", overwrite=True)
            kinds: list[tuple[str, str, list[str], dict[str, Any], float]] = []
            if text_weight > 0:
                kinds.append(("text", hallucinated[i], [clean_rel], {}, text_weight))
            if image_weight > 0:
                noisy_rel = writer.add_media(noisy[i], f"media/{rec.id}-povid_noise.png", overwrite=True)
                corruption = describe("povid_noise", seed=noise_seeds[i], t=noise_step)
                if image_negatives == "online":
                    _, record = hacked_negative([clean_rel], [noisy_rel], corruption)
                    kinds.append(("image", "", [clean_rel], {"negative": "online", "corruption": record,
                                                            ONLINE_NEGATIVE: online_negative([noisy_rel])},
                                  image_weight))
                else:
                    rejected_media, record = hacked_negative([clean_rel], [noisy_rel], corruption,
                                                             scored_on=score_rejected_on)
                    kinds.append(("image", noisy_answers[i], rejected_media,
                                  {"negative": "offline", "corruption": record}, image_weight))
            for kind, rejected, rejected_media, extra, weight in kinds:
                online = extra.pop(ONLINE_NEGATIVE, None)
                if online is None and (not rejected or rejected == rec.answer.strip()):
                    report.skipped.setdefault(f"{kind}: empty or identical negative", []).append(rec.id)
                    continue
                meta: dict[str, Any] = {"weight": 2.0 * weight, "povid": {"kind": kind, **extra}}
                if online is not None:
                    meta[ONLINE_NEGATIVE] = online
                writer.write(PreferencePair(
                    id=f"{rec.id}/{kind}", prompt=rec.question, chosen=rec.answer, rejected=rejected,
                    chosen_media=[clean_rel], rejected_media=rejected_media, meta=meta,
                ))
                report.written[kind] += 1
    return report


# ------------------------------------------------------------------------------ two-stage recipe


def _povid_stage(output_dir: str, num_epochs: int) -> TrainConfig:
    """One stage of the official recipe (YiyangZhou/POVID @92c7c67 scripts/run_dpo.sh, run_povid.sh)."""
    return TrainConfig(
        output_dir=output_dir, loss="dpo", loss_kwargs={"beta": 0.1}, lora_r=128, lora_alpha=256.0,
        learning_rate=1e-7, lr_scheduler="cosine", batch_size=1, max_steps=0, num_epochs=num_epochs,
    )


@dataclass
class POVIDRecipeConfig:
    """POVID's two-stage recipe (every field a CLI flag and a YAML key).

    Stage 1: DPO on the *text* pairs only (each weight 1), 3 epochs; its LoRA is merged into the model
    (saved to ``output_dir/stage1_merged``). Stage 2: the merged model, which is also the new reference,
    trained on every pair with POVID's 0.5/0.5 weights for 1 epoch. Both stages as the official
    scripts: beta 0.1, LoRA r128/alpha 256 on the language model, lr 1e-7, cosine, warmup ratio 0.03,
    1 pair per device.

    Start from ``scripts/configs/llava15_povid_recipe.yaml`` and override on top of it: the flag parser
    builds a nested config from the keys it is given, so a ``--stage1.*`` flag *without* a YAML that
    lists the stage starts that stage from ``TrainConfig``'s own defaults, not from this recipe's.
    """

    model: str = field(default="", metadata=help_("model folder or hub name (AutoModelForImageTextToText)"))
    data: str = field(default="", metadata=help_("pair dataset from vision.povid.build_povid_pairs"))
    output_dir: str = field(default="runs/povid", metadata=help_("stage1/, stage1_merged/ and stage2/ go here"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    max_length: int | None = field(default=1024, metadata=help_("max tokens per row (POVID: model_max_length 1024)"))
    lora_scope: str = field(default="language", metadata=help_("language | language+projector | all"))
    warmup_ratio: float = field(default=0.03, metadata=help_("linear warmup over this fraction of each stage"))
    stage1: TrainConfig = field(default_factory=lambda: _povid_stage("", 3),
                                metadata=help_("stage 1: text-negative DPO (output_dir default: <output_dir>/stage1)"))
    stage2: TrainConfig = field(default_factory=lambda: _povid_stage("", 1),
                                metadata=help_("stage 2: 0.5/0.5 objective (output_dir default: <output_dir>/stage2)"))

    def __post_init__(self) -> None:
        # model and data are checked by run_povid_recipe: a config that builds without arguments lets
        # the flag parser start from these recipe defaults when a flag changes one stage field
        for name in ("stage1", "stage2"):
            stage = getattr(self, name)
            if stage.output_dir in ("", "runs/default"):
                setattr(self, name, dataclasses.replace(stage, output_dir=str(Path(self.output_dir) / name)))


def run_povid_recipe(config: POVIDRecipeConfig) -> tuple[Any, Any]:
    """Run both stages of :class:`POVIDRecipeConfig`; returns the engine's two ``TrainResult``.

    Raises ``ValueError`` when the dataset has no text pair (stage 1 would have nothing to train on).
    """
    from mmalign.distributed import process_state
    from mmalign.engine import train
    from mmalign.pairs import PairDataset, PreferencePair
    from vision.adapter import VLMAdapter
    from vision.train import apply_warmup_ratio, load_vlm

    if not config.model or not config.data:
        raise ValueError("POVIDRecipeConfig: model and data are required")
    data = Path(config.data)
    pairs = list(PairDataset(data).pairs)
    text = []
    for pair in pairs:
        if (pair.meta or {}).get("povid", {}).get("kind") == "text":
            d = pair.to_dict()
            d["meta"]["weight"] = 1.0  # stage 1 is plain DPO on the text negatives
            text.append(PreferencePair.from_dict(d))
    if not text:
        raise ValueError(f"{data}: no POVID text pair (meta.povid.kind == 'text') for stage 1")
    world = process_state().num_processes
    model, processor = load_vlm(config.model, dtype=config.dtype)

    def adapter() -> VLMAdapter:
        a = VLMAdapter(processor, media_root=data, max_length=config.max_length, lora_scope=config.lora_scope)
        a.check_model(model)
        return a

    stage1 = train(model, adapter(), PairDataset(text, root=data),
                   apply_warmup_ratio(config.stage1, len(text), config.warmup_ratio, num_processes=world))
    model = stage1.model
    if config.stage1.lora_r > 0:
        model = model.merge_and_unload()
    merged = Path(config.output_dir) / "stage1_merged"
    if process_state().is_main_process:
        model.save_pretrained(merged, safe_serialization=True)
        processor.save_pretrained(merged)
    stage2 = train(model, adapter(), PairDataset(pairs, root=data),
                   apply_warmup_ratio(config.stage2, len(pairs), config.warmup_ratio, num_processes=world))
    return stage1, stage2


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vision.povid --config recipe.yaml [--flag v ...]``: run :func:`run_povid_recipe`."""
    from mmalign.config import load_config

    config = load_config(POVIDRecipeConfig, list(sys.argv[1:] if argv is None else argv), description=__doc__)
    stage1, stage2 = run_povid_recipe(config)
    print({"stage1_steps": stage1.global_step, "stage2_steps": stage2.global_step,
           "stage2_checkpoint": str(stage2.final_checkpoint)})


if __name__ == "__main__":
    main()
