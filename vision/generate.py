"""Batched generation helpers for vision-language models and plain causal LMs.

Used to build pairs with the policy itself (STIC descriptions, POVID noisy-image answers, SCL
self-corrections) and to rewrite answers with any local text model (POVID hallucination
injection). Prompts are rendered with the processor's chat template
(:func:`vision.adapter.render_prompt`), padded on the left for generation, and the new tokens
decoded with special tokens skipped.

Sampling is seeded **per record**, not per batch: each conversation has its own seed (by default
:func:`record_seed` of ``settings.seed`` and its index in the call; builders pass seeds derived from
record ids) and its own ``torch.Generator``, which draws one uniform number per generated token.
Decoding runs in greedy mode with a logits processor that applies temperature, top-k and top-p and
then samples each row from its own generator, so a record's text depends on its seed and its
inputs only: not on the batch it lands in, on the records before it, or on whether a run was
resumed after a crash (up to float differences between padded batch shapes, which move a sampled
token only when a draw falls within ~1e-6 of a probability boundary). Python's, NumPy's and torch's
global RNGs are never touched, and the model's own ``generation_config`` sampling values
(temperature, top_k, top_p) do not apply: :class:`GenerationSettings` says what is used.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vision.adapter import render_prompt, user_message

__all__ = ["GenerationSettings", "generate_responses", "generate_text", "record_seed", "user_message"]


def record_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (run seed, record id, side): ``sha256(":".join(parts))``.

    Stable across processes and Python versions (unlike ``hash``), so a record keeps its seed in a
    resumed or sharded run.
    """
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


class GenerationSettings:
    """Sampling settings shared by the generation helpers (validated on construction).

    ``temperature=0`` (or ``do_sample=False``) means greedy decoding. When sampling, the
    distribution is ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (default 50: transformers' own default, which official STIC samples with since
    ``stic/generate_pref.py`` passes no ``top_k``; ``0`` or ``None`` keeps every token) and then to the
    ``top_p`` nucleus (``None``: no nucleus cut, as STIC's ``--top_p None``). ``seed`` is the run seed
    per-record seeds derive from.
    """

    def __init__(
        self,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.2,
        top_p: float | None = None,
        top_k: int | None = 50,
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
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.do_sample = (temperature > 0) if do_sample is None else do_sample
        if self.do_sample and temperature == 0:
            raise ValueError("do_sample=True needs temperature > 0")
        self.batch_size = batch_size
        self.seed = seed

    def generate_kwargs(self, pad_token_id: int | None, seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``; ``seeds`` (one per row) are needed when sampling."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        if self.do_sample:
            if seeds is None:
                raise ValueError("GenerationSettings.generate_kwargs: sampling needs one seed per row")
            from transformers import LogitsProcessorList

            # greedy decoding over scores that leave only the token each row sampled itself
            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(self, seeds)])
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        return kwargs


class _RowSampler:
    """Logits processor: warp the scores (temperature, top-k, top-p), draw each row's next token from
    that row's own generator (inverse CDF of one uniform draw), and return scores that are 0 at the
    drawn token and -inf elsewhere, so greedy decoding emits it."""

    def __init__(self, settings: GenerationSettings, seeds: Sequence[int]) -> None:
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers: list[Any] = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            warpers.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p is not None and settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=settings.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"_RowSampler: {scores.shape[0]} rows but {len(self.generators)} seeds")
        probs = torch.softmax(self.warpers(input_ids, scores).double(), dim=-1)
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
        token = torch.searchsorted(cdf, target, right=True).clamp_max(scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


def _row_seeds(settings: GenerationSettings, n: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return [record_seed(settings.seed, i) for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{n} prompts but {len(seeds)} seeds")
    return [int(s) for s in seeds]


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
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Generate one response per conversation with a VLM, in batches.

    Args:
        conversations: a user prompt string each (rendered with ``len(images[i])`` image slots), or
            chat messages (image items ``{"type": "image"}``, e.g. a two-turn self-correction).
        images: PIL images per conversation, in slot order (may be empty for text-only prompts).
        settings: sampling settings; defaults to :class:`GenerationSettings` ``()``.
        seeds: one sampling seed per conversation (see the module docstring); default
            ``record_seed(settings.seed, i)`` for the ``i``-th conversation of this call. Pass seeds
            derived from record ids when the same records may be generated in other calls (resume).

    Returns:
        The decoded new text of each conversation (special tokens skipped), in input order.
    """
    if len(conversations) != len(images):
        raise ValueError(f"generate_responses: {len(conversations)} conversations but {len(images)} image lists")
    settings = settings or GenerationSettings()
    row_seeds = _row_seeds(settings, len(conversations), seeds)
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
        for start in range(0, len(texts), settings.batch_size):
            batch_texts = texts[start : start + settings.batch_size]
            batch_images = [list(x) for x in images[start : start + settings.batch_size]]
            kwargs: dict[str, Any] = {"text": batch_texts, "return_tensors": "pt", "padding": True}
            if any(batch_images):
                if not all(batch_images):
                    raise ValueError("generate_responses: a batch mixes prompts with and without images")
                kwargs["images"] = batch_images
            with _left_padding(tokenizer):
                inputs = processor(**kwargs).to(device)
            batch_seeds = row_seeds[start : start + settings.batch_size]
            sequences = model.generate(**inputs, **settings.generate_kwargs(_pad_id(tokenizer), batch_seeds))
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
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Generate one continuation per prompt with a causal LM (or a VLM's processor, text only).

    Args:
        tokenizer: a tokenizer, or a processor (its ``.tokenizer`` is used for padding/decoding).
        chat: render each prompt as a user turn with the chat template; default: when the tokenizer
            has a chat template.
        seeds: one sampling seed per prompt, as in :func:`generate_responses`.
    """
    settings = settings or GenerationSettings()
    row_seeds = _row_seeds(settings, len(prompts), seeds)
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
        for start in range(0, len(texts), settings.batch_size):
            with _left_padding(tok):
                inputs = tok(texts[start : start + settings.batch_size], return_tensors="pt", padding=True).to(device)
            inputs.pop("token_type_ids", None)
            kwargs = settings.generate_kwargs(_pad_id(tok), row_seeds[start : start + settings.batch_size])
            sequences = model.generate(**inputs, **kwargs)
            out.extend(tok.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out

