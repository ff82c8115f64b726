"""STIC: self-training on image comprehension (Deng et al. 2024), three stages.

1. :func:`build_stic_pairs` makes a pair dataset from a folder of unlabeled images with the policy
   itself. Preferred: the model's description of the *clean* image under the step-by-step prompt
   (:data:`mmalign.prompts.STIC_DESCRIBE_PROMPT`, temperature 0.2). Dispreferred, 50/50
   (:func:`mmalign.prompts.stic_negative_plan`): a hallucination prompt on the clean image, or a
   plain describe prompt on a *corrupted* image (``stic_lowres`` or ``stic_color_jitter``, 50/50).
   The corrupted image only *generates* the dispreferred description: both sides of the pair are
   scored on the clean image (``chosen_media == rejected_media``), as official STIC trains (one clean
   image per batch, ``batch['images']`` for both sides in ``stic/dpo_trainer.py``, yihedeng9/STIC
   @993734e); the rule lives in :func:`mmalign.corruptions.hacked_negative`. The corrupted image is
   saved into the dataset and recorded in ``meta["stic"]["corruption"]`` (name, parameters, seed,
   ``media``: its path, ``scored_on``). ``STICConfig.score_rejected_on="corrupted"`` scores the
   rejected side on the corrupted image instead (an ablation, not the paper's form). The released
   STIC code never applied the corruption (the flag was not passed); here the model is shown exactly
   the saved corrupted pixels, and a test checks it. The low-res image is the 20-px image itself
   (``lowres_restore=False``), handed to the processor as official STIC does (``T.Resize(size=20)``
   on the PIL image); the processor upsamples it.
2. :func:`train_stic_dpo`: DPO (beta 0.1) plus the chosen-NLL term ``-log pi(y_c) / 1024`` through
   :func:`mmalign.engine.train`, with the paper's recipe by default (:func:`stic_dpo_config`).
3. :func:`build_description_infused_set` prepends the model's own description to instruction data
   (``"Image description:\\n{desc}\\n\\n{instruction}"``); :func:`train_description_infused` runs the
   SFT through the engine, with the paper's recipe by default (:func:`stic_sft_config`).

Stage 1 details:

* Pair ids are ``"stic/<image path relative to the image folder>"``; the plan (branch, prompts,
  corruption seed) and the sampling seeds of both descriptions (:func:`vision.generate.record_seed`
  of ``(seed, image id, side)``) are functions of ``(seed, image id)`` only, so the pairs do not
  depend on batching, sharding or resumption: a run killed inside a batch and resumed writes the
  same texts as an uninterrupted one.
* Generation follows official STIC's ``generate_pref.py``: temperature 0.2, ``max_new_tokens`` 1024
  (the step-by-step descriptions run long; 256 cut them), no nucleus cut, and transformers' default
  ``top_k=50`` (STIC passes none).
* Resumable and sharded through :mod:`mmalign.sharding` (as POVID and SCL). Resumable: each process
  appends to its own shard ``out_dir/shards/rankNNNNN/pairs.jsonl`` through :class:`mmalign.pairs.PairWriter` (one crash-safe line per pair, media written before the line).
  On start, the ids in *all* shards count as done, so a re-run after a crash (with any number of
  processes) continues with no duplicate and no missing pair.
* Sharded: ``rank``/``world_size`` default to :func:`mmalign.distributed.process_state` (accelerate's
  state, joined to the gloo group on CPU); image ``i`` (sorted
  order) belongs to rank ``i % world_size``. After all ranks finish, rank 0 merges the shards into
  ``out_dir/pairs.jsonl`` (media paths stay inside ``out_dir``: ``shards/rankNNNNN/media/...``).
* Bad images: unreadable or truncated files and files with other extensions are skipped and
  counted with their reason; non-RGB images (grayscale, RGBA, palette, 16-bit, CMYK) are converted
  to RGB by :func:`mmalign.pairs.load_image` and counted (``non_rgb="skip"`` skips them instead).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import help_
from mmalign.corruptions import REJECTED_SCORED_ON
from mmalign.prompts import DESCRIBE_PROMPTS, STIC_DESCRIBE_PROMPT, description_infused, stic_negative_plan
from mmalign.sharding import ShardedRun, ShardReport, media_stem
from mmalign.sharding import merge_shards as _merge_shards
from vision.generate import GenerationSettings, generate_responses, record_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "STICConfig",
    "STICReport",
    "build_description_infused_set",
    "build_stic_pairs",
    "merge_shards",
    "stic_dpo_config",
    "stic_sft_config",
    "train_description_infused",
    "train_stic_dpo",
]

STIC_META_MEDIA: tuple[str, ...] = ("stic.corruption.media",)
"""Media lists inside a STIC pair's ``meta`` (rewritten by :func:`merge_shards`)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class STICConfig:
    """Stage-1 settings (each field a CLI flag / YAML key through :mod:`mmalign.config`)."""

    image_dir: str = field(default="", metadata=help_("folder of unlabeled images (searched recursively)"))
    out_dir: str = field(default="", metadata=help_("pair dataset folder to create or resume"))
    max_new_tokens: int = field(default=1024, metadata=help_("tokens per generated description (STIC: 1024)"))
    temperature: float = field(default=0.2, metadata=help_("sampling temperature (STIC: 0.2)"))
    top_k: int | None = field(
        default=50, metadata=help_("sampling top-k (STIC passes none: transformers' default 50); 0 = off")
    )
    top_p: float | None = field(default=None, metadata=help_("sampling top-p (STIC: None, no nucleus cut)"))
    batch_size: int = field(default=8, metadata=help_("images per generate() call"))
    seed: int = field(default=0, metadata=help_("seed of plans, corruptions and sampling"))
    pair_prompt: str | None = field(
        default=None, metadata=help_("prompt stored in the pairs (None: a plain describe prompt per image)")
    )
    lowres_size: int = field(default=20, metadata=help_("stic_lowres: shorter side of the low-res image"))
    lowres_restore: bool = field(
        default=False,
        metadata=help_("resize the low-res image back to its size before the processor (STIC: no, the "
                       "20-px image goes to the processor as is)"),
    )
    score_rejected_on: str = field(
        default="clean",
        metadata=help_("clean (STIC: both sides scored on the clean image) | corrupted (ablation: the rejected "
                       "side on the corrupted image that produced it)"),
    )
    non_rgb: str = field(default="convert", metadata=help_("convert | skip non-RGB images"))
    limit: int | None = field(default=None, metadata=help_("use only the first N images (sorted)"))
    system_prompt: str | None = field(default=None, metadata=help_("system message for generation"))

    def __post_init__(self) -> None:
        if self.non_rgb not in ("convert", "skip"):
            raise ValueError(f"STICConfig.non_rgb must be 'convert' or 'skip', got {self.non_rgb!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("STICConfig: batch_size and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"STICConfig.temperature must be >= 0, got {self.temperature}")
        if self.lowres_size < 1:
            raise ValueError(f"STICConfig.lowres_size must be >= 1, got {self.lowres_size}")
        if self.score_rejected_on not in REJECTED_SCORED_ON:
            raise ValueError(
                f"STICConfig.score_rejected_on must be one of {REJECTED_SCORED_ON}, got {self.score_rejected_on!r}"
            )
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"STICConfig.limit must be >= 1 or None, got {self.limit}")


@dataclass
class STICReport(ShardReport):
    """What one call of :func:`build_stic_pairs` did (this process only, except ``merged``); ``converted``:
    image path -> the conversion to RGB it went through."""

    converted: dict[str, str] = field(default_factory=dict)


def check_stic_folders(config: STICConfig) -> None:
    """Both folders named, the images there: never the current directory by default."""
    if not config.image_dir:
        raise ValueError("STIC: image_dir is required (--stic.image_dir FOLDER of unlabeled images)")
    if not config.out_dir:
        raise ValueError("STIC: out_dir is required (--stic.out_dir FOLDER for the pair dataset)")
    if not Path(config.image_dir).is_dir():
        raise FileNotFoundError(f"STIC image folder {config.image_dir!r} does not exist or is not a folder")


def _image_files(image_dir: Path) -> list[Path]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"STIC image folder {str(image_dir)!r} does not exist or is not a folder")
    return sorted((p for p in image_dir.rglob("*") if p.is_file()), key=lambda p: p.relative_to(image_dir).as_posix())


def _int_seed(*parts: Any) -> int:
    """56-bit seed of the plan and the corruption (kept as before: existing datasets resume with the same plans)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")


def build_stic_pairs(
    model: torch.nn.Module,
    processor: Any,
    config: STICConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool = True,
    generate_fn: Callable[..., list[str]] = generate_responses,
) -> STICReport:
    """STIC stage 1: write (or resume) a pair dataset in ``config.out_dir`` from ``config.image_dir``.

    Args:
        model, processor: the policy (an ``AutoModelForImageTextToText``) and its ``AutoProcessor``.
        rank, world_size: this process's shard; default from :func:`mmalign.distributed.process_state`.
        merge: after all ranks finish, rank 0 merges the shards into ``out_dir/pairs.jsonl``.
        generate_fn: the batched generator (``vision.generate.generate_responses`` signature).

    Returns:
        A :class:`STICReport` (pairs written now, already done, skipped with reasons, converted).
    """
    from mmalign.corruptions import apply_corruption, describe, hacked_negative, pil_to_tensor, tensor_to_pil
    from mmalign.pairs import PairFormatError, PreferencePair, load_image

    check_stic_folders(config)
    image_dir, out_dir = Path(config.image_dir), Path(config.out_dir)
    files = _image_files(image_dir)
    if config.limit is not None:
        files = files[: config.limit]
    run = ShardedRun(out_dir, rank=rank, world_size=world_size)
    report = STICReport(out_dir=str(out_dir))
    settings = GenerationSettings(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, batch_size=config.batch_size, seed=config.seed,
    )

    todo: list[tuple[str, Path]] = []
    for i, path in enumerate(files):
        image_id = path.relative_to(image_dir).as_posix()
        if not run.mine(i):
            report.other_ranks += 1
        elif f"stic/{image_id}" in run.done:
            report.already_done += 1
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            report.skip(f"unsupported extension {path.suffix or '(none)'!r}", str(path))
        else:
            todo.append((image_id, path))

    with run.writer() as writer:
        for start in range(0, len(todo), config.batch_size):
            items: list[dict[str, Any]] = []
            for image_id, path in todo[start : start + config.batch_size]:
                notes: list[str] = []
                try:
                    clean = load_image(path, notes=notes)
                except ValueError as exc:
                    report.skip("unreadable image", f"{path}: {exc}")
                    continue
                conversions = [n for n in notes if n.startswith("converted")]
                if conversions and config.non_rgb == "skip":
                    report.skip("non-RGB image", f"{path}: {conversions[0]}")
                    continue
                if conversions:
                    report.converted[str(path)] = "; ".join(conversions)
                rng = random.Random(_int_seed(config.seed, image_id))
                plan = stic_negative_plan(rng)
                pair_prompt = config.pair_prompt or rng.choice(DESCRIBE_PROMPTS)
                item: dict[str, Any] = {
                    "id": image_id, "path": path, "clean": clean, "plan": plan, "prompt": pair_prompt,
                    "notes": notes, "rejected_image": clean, "corruption": None,
                }
                if plan.corruption is not None:
                    if plan.corruption == "stic_lowres" and min(clean.size) <= config.lowres_size:
                        report.skip(f"image smaller than stic_lowres size {config.lowres_size}", str(path))
                        continue
                    kwargs: dict[str, Any] = {}
                    if plan.corruption == "stic_lowres":
                        kwargs = {"size": config.lowres_size, "restore": config.lowres_restore}
                    seed = _int_seed(config.seed, image_id, plan.corruption)
                    generator = torch.Generator().manual_seed(seed)
                    corrupted = apply_corruption(plan.corruption, pil_to_tensor(clean), generator=generator, **kwargs)
                    # the PNG written below is lossless, so the model sees exactly the saved pixels
                    item["rejected_image"] = tensor_to_pil(corrupted)
                    item["corruption"] = describe(plan.corruption, seed=seed, **kwargs)
                items.append(item)
            if not items:
                continue
            # one seed per record and side: the texts do not depend on batching or resumption
            chosen = generate_fn(
                model, processor, [STIC_DESCRIBE_PROMPT] * len(items), [[it["clean"]] for it in items],
                settings, system_prompt=config.system_prompt,
                seeds=[record_seed(config.seed, it["id"], "chosen") for it in items],
            )
            rejected = generate_fn(
                model, processor, [it["plan"].prompt for it in items], [[it["rejected_image"]] for it in items],
                settings, system_prompt=config.system_prompt,
                seeds=[record_seed(config.seed, it["id"], "rejected") for it in items],
            )
            for it, chosen_text, rejected_text in zip(items, chosen, rejected, strict=True):
                name = media_stem(it["id"])
                clean_rel = writer.add_media(it["clean"], f"media/{name}.png", overwrite=True)
                rejected_media, corruption = [clean_rel], None
                if it["corruption"] is not None:
                    corrupted_rel = writer.add_media(
                        it["rejected_image"], f"media/{name}-{it['corruption']['name']}.png", overwrite=True
                    )
                    rejected_media, corruption = hacked_negative(
                        [clean_rel], [corrupted_rel], it["corruption"], scored_on=config.score_rejected_on
                    )
                meta = {
                    "stic": {
                        "image_id": it["id"],
                        "branch": "hallucination" if it["corruption"] is None else "corruption",
                        "chosen_prompt": STIC_DESCRIBE_PROMPT,
                        "rejected_prompt": it["plan"].prompt,
                        "corruption": corruption,
                        "notes": it["notes"],
                        "shard": run.shard_rel,
                    }
                }
                try:  # the pair rules (blank text, sides equal up to whitespace) are the core's
                    pair = PreferencePair(
                        id=f"stic/{it['id']}", prompt=it["prompt"], chosen=chosen_text, rejected=rejected_text,
                        chosen_media=[clean_rel], rejected_media=rejected_media, meta=meta,
                    )
                except PairFormatError as exc:
                    report.skip(f"generation breaks a pair rule ({exc.field})", f"{it['path']}: {exc.reason}")
                    continue
                writer.write(pair)
                report.written += 1
            writer.sync()

    report.merged = run.finish(merge=merge, order=[f"stic/{p.relative_to(image_dir).as_posix()}" for p in files],
                               meta_media=STIC_META_MEDIA)
    return report


def merge_shards(out_dir: str | Path, *, order: Sequence[str] | None = None) -> int:
    """:func:`mmalign.sharding.merge_shards` for STIC datasets (the corrupted image's path in
    ``meta["stic"]["corruption"]["media"]`` is rewritten too); returns the pair count."""
    return _merge_shards(out_dir, order=order, meta_media=STIC_META_MEDIA)


def _stic_recipe(n_pairs: int, num_processes: int, total_batch: int, fields: dict[str, Any],
                 overrides: dict[str, Any]) -> Any:
    """LoRA r128/alpha 256, cosine after a 3% linear warmup (rounded up as transformers does), 1 epoch,
    ``total_batch`` pairs per optimizer step split over ``num_processes``; ``fields`` then ``overrides``."""
    from mmalign.engine import TrainConfig
    from vision.train import apply_warmup_ratio

    base: dict[str, Any] = {
        "lora_r": 128, "lora_alpha": 256.0, "lr_scheduler": "cosine", "max_steps": 0, "num_epochs": 1,
        "batch_size": max(1, total_batch // num_processes),
    }
    return apply_warmup_ratio(TrainConfig(**{**base, **fields, **overrides}), n_pairs, 0.03,
                              num_processes=num_processes)


def stic_dpo_config(n_pairs: int, *, num_processes: int = 1, **overrides: Any) -> Any:
    """STIC stage 2's recipe as a :class:`mmalign.engine.TrainConfig` for a dataset of ``n_pairs``.

    From the paper and ``scripts/dpo_finetune.sh`` (yihedeng9/STIC @993734e): DPO with beta 0.1 plus
    the chosen NLL divided by 1024 (``sft_weight=1``, ``sft_normaliser=1024``), LoRA r=128,
    alpha=256 (language-model linear layers: the adapter's default targets, as LLaVA's
    ``find_all_linear_names`` skips the vision tower and projector), lr 1e-7, cosine schedule after a
    linear warmup over 3% of the steps (``warmup_ratio 0.03``, rounded up as transformers does),
    1 epoch, 8 pairs per optimizer step (1 per device x 2 accumulation x 4 GPUs there; here
    ``batch_size=8`` split over ``num_processes``). ``overrides`` replace fields (e.g. ``output_dir``).
    """
    fields = {"loss": "dpo", "loss_kwargs": {"beta": 0.1}, "sft_weight": 1.0, "sft_normaliser": 1024.0,
              "learning_rate": 1e-7}
    return _stic_recipe(n_pairs, num_processes, 8, fields, overrides)


def stic_sft_config(n_pairs: int, *, num_processes: int = 1, **overrides: Any) -> Any:
    """STIC stage 3's recipe (description-infused SFT; ``scripts/finetune_lora.sh``, yihedeng9/STIC @993734e):
    the ``"sft"`` objective (mean chosen NLL per token), LoRA r128/alpha 256, lr 2e-5, cosine, 3% warmup,
    1 epoch, 32 examples per step (16 per device x 2 GPUs there)."""
    fields = {"loss": "sft", "sft_weight": 1.0, "learning_rate": 2e-5}
    return _stic_recipe(n_pairs, num_processes, 32, fields, overrides)


def train_stic_dpo(
    model: torch.nn.Module,
    processor: Any,
    pairs_dir: str | Path,
    config: Any = None,
    *,
    adapter_kwargs: dict[str, Any] | None = None,
) -> Any:
    """STIC stage 2: DPO (beta 0.1) + ``sft_weight * (-log pi(y_c) / 1024)`` through the engine.

    ``config`` is a :class:`mmalign.engine.TrainConfig`; ``None`` gives the paper's recipe
    (:func:`stic_dpo_config`: lr 1e-7, LoRA r128/alpha 256, cosine, 3% warmup, 1 epoch, batch 8).
    Returns the engine's ``TrainResult``.
    """
    from mmalign.engine import train
    from mmalign.pairs import PairDataset
    from vision.adapter import VLMAdapter

    dataset = PairDataset(pairs_dir)
    if config is None:
        from mmalign.distributed import process_state

        config = stic_dpo_config(len(dataset), num_processes=process_state().num_processes)
    adapter = VLMAdapter(processor, media_root=pairs_dir, **(adapter_kwargs or {}))
    adapter.check_model(model)
    return train(model, adapter, dataset, config)


def build_description_infused_set(
    instructions: Sequence[Any],
    descriptions: dict[str, str],
    out_dir: str | Path,
    *,
    key: Callable[[Any], str] | None = None,
) -> tuple[int, dict[str, int]]:
    """STIC stage 3 data: instruction pairs with the model's description prepended to the prompt.

    Args:
        instructions: :class:`~mmalign.pairs.PreferencePair` records whose ``chosen`` is the reference
            answer (``rejected`` is ignored), with ``root`` set (as read by ``read_pairs``) so their
            images can be copied into ``out_dir``.
        descriptions: description per image, keyed by ``key(pair)`` (default: the first chosen media path).
        out_dir: new dataset folder; pairs keep their media (copied) and get
            ``prompt = "Image description:\\n{desc}\\n\\n{prompt}"``; for SFT the rejected side is empty
            text on the same image (scored but unused).

    Returns:
        ``(written, skipped reasons)``; a pair without a description is skipped and counted.
    """
    from mmalign.pairs import PairWriter, PreferencePair

    key = key or (lambda p: p.chosen_media[0] if p.chosen_media else p.id)
    skipped: dict[str, int] = {}
    written = 0
    with PairWriter(out_dir) as writer:
        for pair in instructions:
            desc = descriptions.get(key(pair), "").strip()
            if not desc:
                skipped["no description"] = skipped.get("no description", 0) + 1
                continue
            media = []
            for rel, path in zip(pair.chosen_media, pair.media_paths()[0], strict=True):
                media.append(writer.add_media(path, rel, overwrite=True))
            writer.write(
                PreferencePair(
                    id=pair.id, prompt=description_infused(desc, pair.prompt), chosen=pair.chosen, rejected="",
                    chosen_media=media, rejected_media=media,
                    meta={**pair.meta, "stic_description": desc},
                )
            )
            written += 1
    return written, skipped


def train_description_infused(
    model: torch.nn.Module,
    processor: Any,
    sft_dir: str | Path,
    config: Any = None,
) -> Any:
    """STIC stage 3: supervised fine-tuning on the description-infused set, through the engine.

    Uses the engine's reference-free ``"sft"`` objective (a zero preference term; the engine's
    ``sft_weight`` chosen-NLL term does the work, mean NLL per token). Raises ``ValueError`` when
    the installed :data:`mmalign.losses.LOSSES` has no ``"sft"`` entry. ``config=None``: the paper's
    recipe (:func:`stic_sft_config`).
    """
    from mmalign.engine import train
    from mmalign.losses import LOSSES
    from mmalign.pairs import PairDataset
    from vision.adapter import VLMAdapter

    if "sft" not in LOSSES:
        raise ValueError(
            "STIC stage 3 needs an 'sft' objective in mmalign.losses.LOSSES (zero preference term, "
            "reference-free); it is not there in this version"
        )
    dataset = PairDataset(sft_dir)
    if config is None:
        from mmalign.distributed import process_state

        config = stic_sft_config(len(dataset), num_processes=process_state().num_processes)
    adapter = VLMAdapter(processor, media_root=sft_dir)
    return train(model, adapter, dataset, config)
