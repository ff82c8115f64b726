"""POVID: hallucination-injected text negatives and diffusion-noise image negatives (Zhou et al. 2024).

Two pair sets over the same (image, question, answer) records, written into one dataset:

* **text** (``id = "povid/<record id>/text"``): chosen = the ground-truth answer, rejected = the answer
  rewritten by a local language model (any causal LM, or the policy used text-only; a parameter, no
  web API) with :func:`mmalign.prompts.hallucination_injection_prompt`;
* **image** (``id = "povid/<record id>/image"``): chosen = the ground-truth answer, rejected = what the
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

Generating the pairs (:func:`build_povid_pairs`, :class:`POVIDPairsConfig`; from the command line
:func:`povid_pairs_command`, e.g. ``--model llava-hf/llava-1.5-7b-hf --povid.records data/llava.json
--povid.image_root data/images --povid.out_dir data/povid_pairs``). Input: a records file, JSONL
``{"id", "image", "question", "answer"}`` per line or LLaVA instruction JSON (first human/gpt turn),
images relative to the file's folder or ``image_root`` (:mod:`vision.records`); bad records are
skipped and counted, each named by file, line and field. Records go in batches of ``batch_size``;
the hallucinated rewrite (seed ``(seed, id, "text")``), the noise (``(seed, id, "povid_noise")``) and
an offline noisy-image answer (``(seed, id, "image")``) are functions of the record only, so the pairs
do not depend on batching, sharding or resumption. Sharded and resumable through
:mod:`mmalign.sharding`: record ``i`` belongs to rank ``i % world_size``, each process appends to
``out_dir/shards/rankNNNNN/``, a re-run skips every pair id already in a shard (and the negatives
logged as making no pair: empty, or equal to the answer), and rank 0 merges the shards into
``out_dir/pairs.jsonl``. The clean image is stored as its own file's bytes (one copy per image file),
the noisy one as a lossless PNG of exactly the pixels used.

The official two-stage recipe (:class:`POVIDRecipeConfig`, :func:`run_povid_recipe`, the YAML
``scripts/configs/llava15_povid_recipe.yaml``; ``python -m vision.povid --config ...``): stage 1 is
plain DPO on the text pairs for 3 epochs (``scripts/run_dpo.sh``), its LoRA merged into the weights;
stage 2 trains the merged model (also the new reference) on both sets with the 0.5/0.5 objective for
1 epoch (``scripts/run_povid.sh``). Both: beta 0.1, LoRA r128/alpha 256, lr 1e-7, cosine, 3% warmup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import help_
from mmalign.corruptions import REJECTED_SCORED_ON
from mmalign.engine import TrainConfig
from mmalign.prompts import hallucination_injection_prompt
from mmalign.sharding import ShardedRun, ShardReport, media_stem
from vision.adapter import ONLINE_NEGATIVE, online_negative
from vision.generate import GenerationSettings, generate_responses, generate_text, record_seed
from vision.records import ImageQA, load_records, open_record_image, run_pairs_job, store_record_image

__all__ = [
    "IMAGE_NEGATIVES",
    "POVIDPairsConfig",
    "POVIDPairsJob",
    "POVIDRecipeConfig",
    "build_povid_pairs",
    "inject_hallucinations",
    "load_rewriter",
    "main",
    "povid_pairs_command",
    "run_povid_recipe",
]

#: ``POVIDPairsConfig.image_negatives``: ``"online"`` (official, default) or ``"offline"``.
IMAGE_NEGATIVES: tuple[str, str] = ("online", "offline")


@dataclass
class POVIDPairsConfig:
    """POVID pair generation (every field a CLI flag and a YAML key; the policy is given apart).

    ``records``: a records file of ``{"id", "image", "question", "answer"}`` per line (JSONL), or LLaVA
    instruction JSON (``[{"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}]``,
    first human/gpt turn); images relative to the file's folder or ``image_root``
    (:mod:`vision.records`). ``answer`` is the chosen response of both pairs of a record.
    """

    records: str = field(default="", metadata=help_(
        "records file: JSONL {id, image, question, answer} per line, or LLaVA JSON [{id, image, conversations}] "
        "(first human/gpt turn); image paths relative to the file's folder or image_root"))
    image_root: str = field(default="", metadata=help_("folder image paths resolve against (default: the records' folder)"))
    out_dir: str = field(default="", metadata=help_("pair dataset folder to create or resume"))
    rewriter: str = field(default="", metadata=help_(
        "causal LM (folder, hub name or tiny:<name>) that injects hallucinations into the answers; "
        "default: the policy itself, text only"))
    text_weight: float = field(default=0.5, metadata=help_("weight of the hallucinated-text DPO term (0: no text pairs)"))
    image_weight: float = field(default=0.5, metadata=help_("weight of the noisy-image DPO term (0: no image pairs)"))
    noise_step: int = field(default=500, metadata=help_("diffusion step t of the image noise (POVID: 500 of 1000)"))
    image_negatives: str = field(default="online", metadata=help_(
        "online (POVID: the negative is built at each training step from the saved noisy image) | offline "
        "(the policy's answer on the noisy image, generated now)"))
    score_rejected_on: str = field(default="clean", metadata=help_(
        "offline only: clean (the negative scored on the clean image) | corrupted (ablation)"))
    batch_size: int = field(default=8, metadata=help_("records per generate() call"))
    max_new_tokens: int = field(default=512, metadata=help_("tokens per rewritten answer / noisy-image answer"))
    temperature: float = field(default=0.0, metadata=help_("sampling temperature (0: greedy)"))
    seed: int = field(default=0, metadata=help_("seed of the noise and of sampling (per record)"))
    limit: int | None = field(default=None, metadata=help_("use only the first N records of the file"))
    skip_bad: bool = field(default=True, metadata=help_(
        "skip and count bad records (named by file, line and field); false: stop at the first"))
    system_prompt: str | None = field(default=None, metadata=help_("system message for the policy's generation"))
    progress: bool = field(default=True, metadata=help_("progress bar (rank 0)"))

    def __post_init__(self) -> None:
        # records and out_dir are checked by build_povid_pairs: a config that builds without arguments
        # lets the flag parser start from these defaults
        tw, iw = self.text_weight, self.image_weight
        if tw < 0 or iw < 0 or tw + iw == 0:
            raise ValueError(f"POVID weights must be >= 0 and not both 0, got {tw}, {iw}")
        if self.image_negatives not in IMAGE_NEGATIVES:
            raise ValueError(f"image_negatives must be one of {IMAGE_NEGATIVES}, got {self.image_negatives!r}")
        if self.score_rejected_on not in REJECTED_SCORED_ON:
            raise ValueError(f"score_rejected_on must be one of {REJECTED_SCORED_ON}, got {self.score_rejected_on!r}")
        if self.image_negatives == "online" and self.score_rejected_on != "clean":
            raise ValueError("online image negatives are always scored with the clean-image logits (as POVID)")
        if not 0 < self.noise_step <= 1000:
            raise ValueError(f"noise_step must be in [1, 1000], got {self.noise_step}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("POVIDPairsConfig: batch_size and max_new_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"POVIDPairsConfig.limit must be >= 1 or None, got {self.limit}")

    def kinds(self) -> list[str]:
        """The pair kinds this config writes per record: ``"text"`` and/or ``"image"``."""
        return [k for k, w in (("text", self.text_weight), ("image", self.image_weight)) if w > 0]


#: media lists inside a POVID pair's ``meta`` (rewritten when shards are merged)
POVID_META_MEDIA: tuple[str, ...] = ("povid.corruption.media", f"{ONLINE_NEGATIVE}.media")


def inject_hallucinations(
    rewriter: torch.nn.Module,
    tokenizer: Any,
    answers: Sequence[str],
    questions: Sequence[str | None] | None = None,
    settings: GenerationSettings | None = None,
    *,
    seeds: Sequence[int] | None = None,
    text_fn: Callable[..., list[str]] = generate_text,
) -> list[str]:
    """Rewrite each answer with plausible hallucinations using a local LM (``rewriter``); stripped texts.

    ``seeds``: one sampling seed per answer (:func:`vision.generate.generate_text`); ``text_fn``: the
    generator (``generate_text`` signature).
    """
    questions = list(questions) if questions is not None else [None] * len(answers)
    prompts = [hallucination_injection_prompt(a, q) for a, q in zip(answers, questions, strict=True)]
    return [t.strip() for t in text_fn(rewriter, tokenizer, prompts, settings, seeds=seeds)]


def build_povid_pairs(
    policy: torch.nn.Module,
    processor: Any,
    config: POVIDPairsConfig,
    *,
    records: Sequence[ImageQA] | None = None,
    rewriter: torch.nn.Module | None = None,
    rewriter_tokenizer: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    generate_fn: Callable[..., list[str]] = generate_responses,
    rewrite_fn: Callable[..., list[str]] = generate_text,
) -> ShardReport:
    """Write (or resume) POVID's two pair sets in ``config.out_dir`` (see the module docstring).

    Args:
        policy, processor: the VLM being aligned and its ``AutoProcessor``.
        config: what to generate; ``config.records`` is read unless ``records`` is given.
        records: in-memory records (``image`` a path or a PIL image) instead of the file.
        rewriter, rewriter_tokenizer: the causal LM that injects hallucinations; ``None``: the policy,
            text only, through ``processor``.
        rank, world_size: this process's shard; default :func:`mmalign.distributed.process_state`.
        merge: after every rank finishes, rank 0 merges the shards into ``out_dir/pairs.jsonl``.
        generate_fn: the VLM generator (:func:`vision.generate.generate_responses` signature; offline
            image negatives only).
        rewrite_fn: the text generator (:func:`vision.generate.generate_text` signature).

    Returns:
        A :class:`mmalign.sharding.ShardReport`; ``counts``: pairs written per kind (``"text"``,
        ``"image"``); ``skipped``: bad records, unreadable images, and negatives that make no pair (empty,
        or equal to the answer), the last logged so a re-run does not generate them again.
    """
    from tqdm.auto import tqdm

    from mmalign.corruptions import pil_to_tensor, povid_noise, tensor_to_pil
    from mmalign.pairs import PairFormatError, PreferencePair

    if not config.out_dir:
        raise ValueError("POVIDPairsConfig.out_dir is required")
    if rewriter is not None and rewriter_tokenizer is None:
        raise ValueError("build_povid_pairs: pass rewriter_tokenizer with rewriter")
    report = ShardReport(out_dir=config.out_dir)
    run = ShardedRun(config.out_dir, rank=rank, world_size=world_size)
    records = load_records(config, records, report, count_bad=run.rank == 0)
    kinds = config.kinds()
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  batch_size=config.batch_size, seed=config.seed)
    text_model, text_tok = (rewriter, rewriter_tokenizer) if rewriter is not None else (policy, processor)

    todo: list[tuple[ImageQA, list[str]]] = []
    for i, rec in enumerate(records):
        if not run.mine(i):
            report.other_ranks += len(kinds)
            continue
        left = [k for k in kinds if f"povid/{rec.id}/{k}" not in run.done]
        report.already_done += len(kinds) - len(left)
        if left:
            todo.append((rec, left))

    bar = tqdm(total=len(todo), desc="povid", disable=not config.progress or run.rank != 0)
    with run.writer() as writer:
        for start in range(0, len(todo), config.batch_size):
            items = []
            for rec, left in todo[start : start + config.batch_size]:
                image = open_record_image(rec, report)
                if image is None:
                    bar.update(1)
                    continue
                items.append({"rec": rec, "kinds": left, "image": image})
            if not items:
                continue
            texted = [it for it in items if "text" in it["kinds"]]
            if texted:
                hallucinated = inject_hallucinations(
                    text_model, text_tok, [it["rec"].answer for it in texted], [it["rec"].question for it in texted],
                    settings, seeds=[record_seed(config.seed, it["rec"].id, "text") for it in texted],
                    text_fn=rewrite_fn,
                )
                for it, text in zip(texted, hallucinated, strict=True):
                    it["text"] = text
            imaged = [it for it in items if "image" in it["kinds"]]
            for it in imaged:
                it["noise_seed"] = record_seed(config.seed, it["rec"].id, "povid_noise")
                generator = torch.Generator().manual_seed(it["noise_seed"])
                noisy = povid_noise(pil_to_tensor(it["image"]), t=config.noise_step, generator=generator)
                it["noisy"] = tensor_to_pil(noisy)  # saved as PNG below: exactly these pixels
            if imaged and config.image_negatives == "offline":
                answers = generate_fn(
                    policy, processor, [it["rec"].question for it in imaged], [[it["noisy"]] for it in imaged],
                    settings, system_prompt=config.system_prompt,
                    seeds=[record_seed(config.seed, it["rec"].id, "image") for it in imaged],
                )
                for it, text in zip(imaged, answers, strict=True):
                    it["offline"] = text.strip()
            for it in items:
                rec = it["rec"]
                clean_rel = store_record_image(writer, rec, it["image"])
                for kind in it["kinds"]:
                    pid = f"povid/{rec.id}/{kind}"
                    rejected, rejected_media, meta = _negative(kind, it, clean_rel, writer, config)
                    if not rejected and ONLINE_NEGATIVE not in meta:
                        run.outcome(pid, f"{kind}: empty negative")
                        report.skip(f"{kind}: empty negative", pid)
                        continue
                    try:  # the pair rules (sides equal up to whitespace, ...) are the core's
                        pair = PreferencePair(id=pid, prompt=rec.question, chosen=rec.answer, rejected=rejected,
                                              chosen_media=[clean_rel], rejected_media=rejected_media, meta=meta)
                    except PairFormatError as exc:
                        run.outcome(pid, f"{kind}: breaks a pair rule ({exc.field}): {exc.reason}")
                        report.skip(f"{kind}: generation breaks a pair rule ({exc.field})", f"{pid}: {exc.reason}")
                        continue
                    writer.write(pair)
                    report.written += 1
                    report.count(kind)
                bar.update(1)
            writer.sync()
            run.sync()
    bar.close()
    order = [f"povid/{rec.id}/{k}" for rec in records for k in kinds]
    report.merged = run.finish(merge=merge, order=order, meta_media=POVID_META_MEDIA)
    return report


def _negative(kind: str, item: dict[str, Any], clean_rel: str, writer: Any,
              config: POVIDPairsConfig) -> tuple[str, list[str], dict[str, Any]]:
    """``(rejected text, rejected media, meta)`` of one record's ``kind`` pair; the noisy image is saved
    into the shard for the image pair."""
    from mmalign.corruptions import describe, hacked_negative

    weight = config.text_weight if kind == "text" else config.image_weight
    meta: dict[str, Any] = {"weight": 2.0 * weight, "povid": {"kind": kind, "record_id": item["rec"].id}}
    if kind == "text":
        return item["text"], [clean_rel], meta
    noisy_rel = writer.add_media(item["noisy"], f"media/{media_stem(item['rec'].id)}-povid_noise.png",
                                 overwrite=True)
    corruption = describe("povid_noise", seed=item["noise_seed"], t=config.noise_step)
    online = config.image_negatives == "online"
    rejected_media, record = hacked_negative([clean_rel], [noisy_rel], corruption,
                                             scored_on="clean" if online else config.score_rejected_on)
    meta["povid"].update(negative=config.image_negatives, corruption=record)
    if online:  # built at each training step by the adapter from the noisy image
        meta[ONLINE_NEGATIVE] = online_negative([noisy_rel])
        return "", rejected_media, meta
    return item["offline"], rejected_media, meta


@dataclass
class POVIDPairsJob:
    """POVID pair generation from the command line: the policy plus :class:`POVIDPairsConfig`."""

    model: str = field(default="", metadata=help_("policy: folder, hub name or tiny:<family>"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoints' own code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    povid: POVIDPairsConfig = field(default_factory=POVIDPairsConfig, metadata=help_("pair generation"))


def load_rewriter(name: str, *, trust_remote_code: bool = False, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM from a folder, a hub name or ``tiny:<name>``; safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmalign.hub import resolve_pretrained

    path = resolve_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                 dtype=dtype)
    return model, tokenizer


def povid_pairs_command(argv: list[str]) -> int:
    """POVID pairs: hallucinated-text and noisy-image negatives for a records file; resumable, sharded.

    ``--model M --povid.records R --povid.out_dir O [--povid.<field> V ...] [--config job.yaml]``:
    :func:`build_povid_pairs` with every :class:`POVIDPairsConfig` field as a ``--povid.*`` flag
    (``--povid.rewriter`` names the causal LM that injects hallucinations; default the policy). Re-run
    the same command to resume; under ``accelerate launch`` each process writes its own shard and the
    first merges them. Returns 0, or 2 when the model, the records file or the output folder is missing.
    """
    from mmalign.config import load_config

    job = load_config(POVIDPairsJob, argv, description=povid_pairs_command.__doc__)

    def build(policy: torch.nn.Module, processor: Any, device: Any) -> ShardReport:
        rewriter = tokenizer = None
        if job.povid.rewriter and job.povid.text_weight > 0:
            rewriter, tokenizer = load_rewriter(job.povid.rewriter, trust_remote_code=job.trust_remote_code,
                                                dtype=job.dtype)
            rewriter.to(device)
        return build_povid_pairs(policy, processor, job.povid, rewriter=rewriter, rewriter_tokenizer=tokenizer)

    return run_pairs_job(job, "povid", build)


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

    config = load_config(POVIDRecipeConfig, argv, description=__doc__)
    stage1, stage2 = run_povid_recipe(config)
    print({"stage1_steps": stage1.global_step, "stage2_steps": stage2.global_step,
           "stage2_checkpoint": str(stage2.final_checkpoint)})


if __name__ == "__main__":
    main()
