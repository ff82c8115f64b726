"""Batched generation helpers for vision-language models and plain causal LMs.

Used to build pairs with the policy itself (STIC descriptions, POVID noisy-image answers, SCL
self-corrections) and to rewrite answers with any local text model (POVID hallucination
injection). Prompts are rendered with the processor's chat template
(:func:`vision.adapter.render_prompt`), padded on the left for generation, and the new tokens
decoded with special tokens skipped. Sampling is seeded per batch inside a forked RNG, so the
caller's random state is untouched and the same inputs, batching and seed give the same texts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmalign.tiny import seeded
from vision.adapter import render_prompt, user_message

__all__ = ["GenerationSettings", "generate_responses", "generate_text", "user_message"]


class GenerationSettings:
    """Sampling settings shared by the generation helpers (validated on construction).

    ``temperature=0`` (or ``do_sample=False``) means greedy decoding.
    """

    def __init__(
        self,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.2,
        top_p: float | None = None,
        do_sample: bool | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.do_sample = (temperature > 0) if do_sample is None else do_sample
        self.batch_size = batch_size
        self.seed = seed

    def generate_kwargs(self, pad_token_id: int | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            kwargs["top_p"] = self.top_p if self.top_p is not None else 1.0
            kwargs["top_k"] = 0
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        return kwargs


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    processor: Any,
    conversations: Sequence[str | Sequence[dict[str, Any]]],
    images: Sequence[Sequence[Any]],
    settings: GenerationSettings | None = None,
    *,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
) -> list[str]:
    """Generate one response per conversation with a VLM, in batches.

    Args:
        conversations: a user prompt string each (rendered with ``len(images[i])`` image slots), or
            chat messages (image items ``{"type": "image"}``, e.g. a two-turn self-correction).
        images: PIL images per conversation, in slot order (may be empty for text-only prompts).
        settings: sampling settings; defaults to :class:`GenerationSettings` ``()``.

    Returns:
        The decoded new text of each conversation (special tokens skipped), in input order.
    """
    if len(conversations) != len(images):
        raise ValueError(f"generate_responses: {len(conversations)} conversations but {len(images)} image lists")
    settings = settings or GenerationSettings()
    tokenizer = processor.tokenizer
    device = _device_of(model)
    texts = [
        render_prompt(processor, conv, len(imgs), system_prompt=system_prompt, prompt_template=prompt_template)
        for conv, imgs in zip(conversations, images, strict=True)
    ]
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b, start in enumerate(range(0, len(texts), settings.batch_size)):
            batch_texts = texts[start : start + settings.batch_size]
            batch_images = [list(x) for x in images[start : start + settings.batch_size]]
            kwargs: dict[str, Any] = {"text": batch_texts, "return_tensors": "pt", "padding": True}
            if any(batch_images):
                if not all(batch_images):
                    raise ValueError("generate_responses: a batch mixes prompts with and without images")
                kwargs["images"] = batch_images
            with _left_padding(tokenizer):
                inputs = processor(**kwargs).to(device)
            with seeded(settings.seed + b, device):
                sequences = model.generate(**inputs, **settings.generate_kwargs(_pad_id(tokenizer)))
            new = sequences[:, inputs["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    chat: bool | None = None,
) -> list[str]:
    """Generate one continuation per prompt with a causal LM (or a VLM's processor, text only).

    Args:
        tokenizer: a tokenizer, or a processor (its ``.tokenizer`` is used for padding/decoding).
        chat: render each prompt as a user turn with the chat template; default: when the tokenizer
            has a chat template.
    """
    settings = settings or GenerationSettings()
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    use_chat = (getattr(tok, "chat_template", None) is not None) if chat is None else chat
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        if use_chat
        else p
        for p in prompts
    ]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b, start in enumerate(range(0, len(texts), settings.batch_size)):
            with _left_padding(tok):
                inputs = tok(texts[start : start + settings.batch_size], return_tensors="pt", padding=True).to(device)
            inputs.pop("token_type_ids", None)
            with seeded(settings.seed + b, device):
                sequences = model.generate(**inputs, **settings.generate_kwargs(_pad_id(tok)))
            out.extend(tok.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out

