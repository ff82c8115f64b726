"""Glue: load a VLM and its processor, build the adapter and dataset, call the engine.

``run(VLMTrainConfig(...))`` is what ``scripts/train_vlm.py`` calls. Models load through
``AutoModelForImageTextToText`` / ``AutoProcessor`` from a local folder or a hub name, with
``trust_remote_code=False`` unless the config turns it on, and weights from safetensors only
(``use_safetensors=True``: a checkpoint with only pickle ``.bin`` weights is refused).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import help_
from mmalign.engine import TrainConfig

__all__ = ["VLMTrainConfig", "apply_warmup_ratio", "load_vlm", "run", "save_result"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VLMTrainConfig:
    """Preference optimisation of a vision-language model (every field a CLI flag and a YAML key)."""

    model: str = field(default="", metadata=help_("model folder or hub name (AutoModelForImageTextToText)"))
    data: str = field(default="", metadata=help_("pair dataset folder, or a TRL file/folder with data_format=trl"))
    data_format: str = field(default="pairs", metadata=help_("pairs (our folder) | trl (converted first)"))
    trust_remote_code: bool = field(default=False, metadata=help_("allow the checkpoint's own Python code"))
    dtype: str = field(default="float32", metadata=help_("float32 | bfloat16 | float16 weights"))
    max_length: int | None = field(default=2048, metadata=help_("max tokens per row (image tokens are never cut)"))
    truncation: str = field(default="response", metadata=help_("response (cut the response) | drop (drop the pair)"))
    share_image_encoding: bool = field(default=True, metadata=help_("encode a pair's shared image once"))
    system_prompt: str | None = field(default=None, metadata=help_("system message for every prompt"))
    fused_head: bool = field(default=True, metadata=help_("log-probs from hidden states and the LM head chunk by "
                                                          "chunk, never the (2B, T, V) logits"))
    padding_free: bool = field(default=False, metadata=help_("run each batch's rows as one packed row without "
                                                             "padding (checked once against the padded batch)"))
    lora_scope: str = field(
        default="language",
        metadata=help_("LoRA targets when train.lora_target_modules is unset: language (the language model's "
                       "linear layers) | language+projector | all (every linear layer but lm_head)"),
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata=help_("linear warmup over this fraction of the optimizer steps (rounded up; sets "
                       "train.warmup_steps from the dataset size, e.g. 0.03 as STIC and POVID)"),
    )
    push_to_hub: str | None = field(default=None, metadata=help_("upload the trained adapter/model folder (with its "
                                                                  "card) to this Hub repo id, private, at the end"))
    validate_every: int = field(
        default=0, metadata=help_("answer validate_question on validate_images every N optimizer steps, greedy, "
                                  "into output_dir/samples.jsonl (0 = off)")
    )
    validate_images: list[str] = field(default_factory=list, metadata=help_("fixed images for validation"))
    validate_question: str = field(default="Describe the image in detail.", metadata=help_("asked of each"))
    validate_max_new_tokens: int = field(default=64, metadata=help_("tokens per validation answer"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=help_("engine settings"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("VLMTrainConfig.model is required (a model folder or name)")
        if not self.data:
            raise ValueError("VLMTrainConfig.data is required (a pair dataset folder)")
        if self.data_format not in ("pairs", "trl"):
            raise ValueError(f"VLMTrainConfig.data_format must be 'pairs' or 'trl', got {self.data_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"VLMTrainConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.truncation not in ("response", "drop"):
            raise ValueError(f"VLMTrainConfig.truncation must be 'response' or 'drop', got {self.truncation!r}")
        from vision.adapter import LORA_SCOPES

        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"VLMTrainConfig.lora_scope must be one of {sorted(LORA_SCOPES)}, got {self.lora_scope!r}")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"VLMTrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.train.warmup_steps:
                raise ValueError("give warmup_ratio or train.warmup_steps, not both")


def apply_warmup_ratio(train: TrainConfig, n_pairs: int, ratio: float, *, num_processes: int = 1) -> TrainConfig:
    """``train`` with ``warmup_steps = ceil(ratio * total optimizer steps)`` (transformers' ``warmup_ratio``).

    The total is the engine's: ``max_steps`` when set, else ``(n_pairs // (batch_size * num_processes))
    // grad_accum * num_epochs`` (at least 1). Example: 6000 pairs, batch 8, 1 epoch: 750 steps, 23
    warmup steps at ratio 0.03.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"warmup ratio must be in [0, 1), got {ratio}")
    if train.max_steps:
        total = train.max_steps
    else:
        per_epoch = (n_pairs // (train.batch_size * num_processes)) // train.grad_accum
        total = max(1, per_epoch * train.num_epochs)
    return dataclasses.replace(train, warmup_steps=math.ceil(ratio * total))


def load_vlm(
    name_or_path: str | Path, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` from a folder, a hub name or ``tiny:<family>`` (a tiny built model, see
    :mod:`mmalign.hub`); safetensors weights only, remote code off by default."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.hub import resolve_pretrained

    name_or_path = resolve_pretrained(name_or_path)
    processor = AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        str(name_or_path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=_DTYPES[dtype]
    )
    return model, processor


def run(config: VLMTrainConfig) -> Any:
    """Train ``config.model`` on ``config.data`` with the engine; returns its ``TrainResult``."""
    from mmalign.engine import train
    from mmalign.pairs import PairDataset, check_media, from_trl
    from vision.adapter import VLMAdapter

    data = Path(config.data)
    if config.data_format == "trl":
        converted = Path(config.train.output_dir) / "pairs_from_trl"
        if not (converted / "pairs.jsonl").exists():
            from_trl(str(data), converted)
        data = converted
    dataset = PairDataset(data)  # the data first: a typo must not cost the minutes of loading a 7B model
    check_media(dataset, progress=config.train.progress)  # every image decodes, before any step
    model, processor = load_vlm(config.model, trust_remote_code=config.trust_remote_code, dtype=config.dtype)
    adapter = VLMAdapter(
        processor, media_root=data, max_length=config.max_length, truncation=config.truncation,
        share_image_encoding=config.share_image_encoding, system_prompt=config.system_prompt,
        lora_scope=config.lora_scope, fused_head=config.fused_head, padding_free=config.padding_free,
    )
    adapter.check_model(model)
    kept, dropped = adapter.filter_pairs(dataset.pairs)
    if dropped:
        print(f"vision.train: dropped {sum(dropped.values())} of {len(dataset)} pairs: {dict(dropped)}")
    if not kept:
        raise ValueError(f"no pair of {data} fits max_length={config.max_length}")
    from mmalign.distributed import process_state

    train_config = config.train
    if config.warmup_ratio is not None:
        train_config = apply_warmup_ratio(train_config, len(kept), config.warmup_ratio,
                                          num_processes=process_state().num_processes)
    callbacks = []
    if config.validate_every and config.validate_images:
        callbacks.append(_ValidationAnswers(processor, config, process_state().is_main_process))
    # the pairs kept were read and their media checked above: no second check
    result = train(model, adapter, PairDataset(kept, root=data, check_media="none"), train_config, callbacks=callbacks)
    if process_state().is_main_process:
        folder = save_result(result, processor, config, dataset=str(data))
        if config.push_to_hub:
            from mmalign.export import push_to_hub

            print(f"pushed {folder} to {config.push_to_hub}: {push_to_hub(folder, config.push_to_hub)}")
    return result


class _ValidationAnswers:
    """Engine callback: every ``validate_every`` steps the main process answers the fixed question on the
    fixed images greedily with the model being trained, one JSON line per step in ``samples.jsonl``."""

    def __init__(self, processor: Any, config: VLMTrainConfig, is_main: bool) -> None:
        from mmalign.pairs import load_image

        self.processor, self.config, self.is_main = processor, config, is_main
        self.images = [[load_image(p)] for p in config.validate_images]  # a bad file fails before training

    def __call__(self, info: Any) -> None:
        if not self.is_main or info.step % self.config.validate_every:
            return
        import json

        from vision.generate import GenerationSettings, generate_responses

        c = self.config
        settings = GenerationSettings(max_new_tokens=c.validate_max_new_tokens, temperature=0.0)
        was_training = info.model.training
        info.model.eval()
        try:
            answers = generate_responses(info.model, self.processor, [c.validate_question] * len(self.images),
                                         self.images, settings)
        finally:
            info.model.train(was_training)
        row = {"step": info.step, "question": c.validate_question,
               "answers": {img: a.strip() for img, a in zip(c.validate_images, answers, strict=True)}}
        with open(Path(c.train.output_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def save_result(result: Any, processor: Any, config: Any, *, dataset: str,
                kind: str = "vision-language") -> Path:
    """The trained model as users load it: ``output_dir/adapter`` (LoRA: a PEFT folder) or
    ``output_dir/model`` (full fine-tuning), with the processor and a model card. ``config`` is a VLM or
    video training config (``model``, ``train``, ``lora_scope``, ``max_length``); ``kind`` is the card's tag."""
    from mmalign.config import config_to_dict
    from mmalign.export import save_trained

    train = config.train
    method = train.loss + (f" + SFT x{train.sft_weight:g}" if train.sft_weight else "")
    keep = ("loss", "loss_kwargs", "sft_weight", "sft_normaliser", "learning_rate", "lr_scheduler", "warmup_steps",
            "batch_size", "grad_accum", "max_steps", "num_epochs", "lora_r", "lora_alpha", "seed")
    hyper = {k: v for k, v in config_to_dict(train).items() if k in keep}
    hyper.update(steps_run=result.global_step, lora_scope=config.lora_scope, max_length=config.max_length)
    last = result.metrics[-1] if result.metrics else {}
    metrics = {k: v for k, v in last.items() if k.startswith(("loss", "rewards/", "logps/"))}
    return save_trained(result.model, processor, train.output_dir, base_model=config.model, method=method,
                        auto_class="AutoModelForImageTextToText", dataset=dataset, hyperparameters=hyper,
                        metrics=metrics, tags=(kind, train.loss))
