"""The sequence adapter for vision-language models (``AutoModelForImageTextToText`` + ``AutoProcessor``).

:class:`VLMAdapter` turns :class:`~mmalign.pairs.PreferencePair` records into one padded batch of
``2B`` rows (chosen rows first, then rejected rows) and returns the summed response-token log-probs
of each row (:func:`mmalign.logprobs.sequence_logps`).

What it does that TRL's VLM DPO does not:

* **Different images per side.** ``pair.chosen_media`` and ``pair.rejected_media`` are encoded
  separately when they differ (a corrupted or noised image on the rejected side).
* **Shared images are encoded once.** Each pair becomes one or two *units* (prompt + image set):
  one when both sides show the same images, two when they differ. The processor runs once per unit,
  the vision tower and projector run once per batch on the distinct units only, and the features are
  handed to both rows through the model's ``mm_encoder_outputs`` argument (transformers >= 5). Pass
  ``share_image_encoding=False`` (or use an older transformers) for the plain path, where every row
  carries its own pixels; both give the same log-probs (tested to 1e-5). The LoRA-disabled reference
  reuses the policy's features of the same batch when they cannot differ (frozen vision tower and
  projector, LoRA on the language model only): one vision pass per step instead of two, bitwise the
  same training (:attr:`VLMAdapter.reused_encodings` counts the reuses).
* **Truncation never cuts image tokens.** The prompt (with its expanded image tokens) is kept whole;
  an over-long pair has its *response* cut (``truncation="response"``) or is dropped
  (``truncation="drop"``); a pair whose prompt alone does not fit is always dropped. Drops are counted
  by reason in :attr:`VLMAdapter.dropped`.
* **Online negatives** (POVID's image negatives, computed on every step as the official code does).
  A pair whose ``meta`` holds :data:`ONLINE_NEGATIVE` (``{"method": "argmax", "media": [...]}``, made
  with :func:`online_negative`) has no rejected text: its rejected row is the *chosen* answer shown
  with the hacked media (the noisy image); in :meth:`VLMAdapter.logps` the top token of that row's
  logits at each answer position is taken (no gradient) and scored with the chosen row's clean-image
  log-softmax, so ``rejected = sum_t log p(argmax_v p(v | noisy, y_<t) | clean, y_<t)``. The policy
  and the reference each do this with their own logits, because the engine calls ``logps`` for both
  (YiyangZhou/POVID @92c7c67 ``tool/dpo_trainer_inherent.py``: ``_get_noisy_batch_logps`` on the
  noisy-image logits of the chosen tokens, gathered from the clean-image chosen logits). The engine
  needs no change for it.
* **Clear errors** when the chat template has no image slot, when the processor's image token is not
  the model's, and when the number of image tokens differs from the number of image features.

Families covered by tests, each with a tiny model from :mod:`mmalign.tiny`: LLaVA-1.5 and Qwen2-VL
(tests/test_vision_adapter.py), LLaVA-NeXT (anyres tiles, ``image_sizes``), Qwen2.5-VL (window attention),
Idefics3 (split tiles, ``pixel_attention_mask``) and SmolVLM (Idefics3's design under its own classes) in
tests/test_vision_families.py. Their ``get_image_features`` return per-image or per-sample features
whose rows match the image tokens; per-image side inputs (``image_sizes``/``image_grid_thw``) are
reordered per row.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign._compat import is_image_token_mismatch
from mmalign.adapter import ChosenRejected
from mmalign.logprobs import model_sequence_logps, model_token_logps, sequence_logps
from mmalign.packing import Packed, pack_rows, use_varlen_sdpa

__all__ = [
    "LORA_SCOPES",
    "ONLINE_NEGATIVE",
    "PER_IMAGE_KEYS",
    "PER_TOKEN_KEYS",
    "Media",
    "VLMAdapter",
    "image_token_of",
    "lora_outside_language",
    "online_negative",
    "render_prompt",
    "user_message",
]

#: Processor outputs with one row per image that the model also needs *after* encoding (positions).
PER_IMAGE_KEYS: tuple[str, ...] = ("image_grid_thw", "image_sizes")
#: Processor outputs with one value per token (rebuilt per row; response and padding get 0).
PER_TOKEN_KEYS: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask")

#: A media item: a path (relative to the dataset folder, or absolute) or an in-memory PIL image.
Media = Any

# LoRA targets as peft regexes (``re.fullmatch`` on module names). The language model is
# ``model.language_model`` in LLaVA-1.5/NeXT and Qwen2-VL/2.5-VL and ``model.text_model`` in
# Idefics3/SmolVLM (transformers 5); all are Llama/Mistral/Qwen2 decoders with these projections.
_LANGUAGE_LINEARS = (
    r"(?:.*\.)?(?:language_model|text_model)\.(?:.*\.)?(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
# LLaVA-1.5/NeXT ``multi_modal_projector``, Qwen2-VL/2.5-VL ``visual.merger``, Idefics3/SmolVLM ``connector``.
_PROJECTOR_LINEARS = (
    r"(?:.*\.)?(?:multi_modal_projector\.linear_\d+|visual\.merger\.mlp\.[02]|connector\.modality_projection\.proj)"
)

#: ``VLMAdapter.lora_scope`` -> peft ``target_modules``. ``"language"`` (default): the language model's
#: linear layers only, as LLaVA's own LoRA recipe (its ``find_all_linear_names`` skips
#: ``mm_projector``/``vision_tower``, used by STIC and POVID); ``"language+projector"`` adds the
#: vision-to-text projector; ``"all"`` is peft's ``"all-linear"`` (vision tower too; ``lm_head`` excluded).
LORA_SCOPES: dict[str, str] = {
    "language": _LANGUAGE_LINEARS,
    "language+projector": f"(?:{_LANGUAGE_LINEARS})|(?:{_PROJECTOR_LINEARS})",
    "all": "all-linear",
}


#: Pair ``meta`` key marking an online negative (see the module docstring and :func:`online_negative`).
ONLINE_NEGATIVE = "online_negative"


def online_negative(media: Sequence[Media], method: str = "argmax") -> dict[str, Any]:
    """The ``meta[ONLINE_NEGATIVE]`` record of a pair whose rejected side is computed each step.

    ``media``: the hacked media (dataset-relative paths) the argmax tokens are read from; the pair's
    ``rejected_media`` stays the clean media they are scored on, its ``rejected`` text empty.
    ``method``: ``"argmax"`` (POVID's), the only one so far.
    """
    if method != "argmax":
        raise ValueError(f"online_negative: unknown method {method!r} (known: 'argmax')")
    if not media:
        raise ValueError("online_negative: needs the hacked media the negative is read from")
    return {"method": method, "media": [str(m) for m in media]}


def _online_media(pair: Any) -> list[Any] | None:
    record = (pair.meta or {}).get(ONLINE_NEGATIVE)
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("method") != "argmax" or not record.get("media"):
        raise ValueError(f"pair {pair.id!r}: meta[{ONLINE_NEGATIVE!r}] must be online_negative(media), got {record!r}")
    return list(record["media"])


def image_token_of(processor: Any) -> tuple[str, int]:
    """The image placeholder token of ``processor`` and its id, e.g. ``("<image>", 32000)``.

    Raises:
        ValueError: the processor defines no image token (not a vision-language processor).
    """
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if token is None:
        raise ValueError(
            f"{type(processor).__name__} has no `image_token`: not a vision-language processor "
            "(load it with AutoProcessor from the model folder)"
        )
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = tokenizer.convert_tokens_to_ids(token)
    return str(token), int(token_id)


def user_message(prompt: str, n_images: int) -> dict[str, Any]:
    """A user chat message with ``n_images`` image slots followed by the text (LLaVA convention)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    return {"role": "user", "content": content}


def _strip_image_tokens(prompt: str, image_token: str) -> str:
    """Remove literal image placeholders from a dataset prompt (LLaVA data writes ``"<image>\\n..."``)."""
    if image_token not in prompt:
        return prompt
    return prompt.replace(image_token + "\n", "").replace(image_token, "").strip()


def render_prompt(
    processor: Any,
    messages: Sequence[dict[str, Any]] | str,
    n_images: int,
    *,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation (or a single user prompt) to the text the processor expands.

    Args:
        messages: a user prompt string, or chat messages whose image items are ``{"type": "image"}``.
        n_images: images the conversation shows; the rendered text must hold exactly that many slots.
        system_prompt: optional system message prepended.
        prompt_template: a plain format string with ``{prompt}`` used *instead* of the chat template
            (e.g. ``"USER: <image>\\n{prompt} ASSISTANT:"``); only for a single user prompt.

    Raises:
        ValueError: the processor has no chat template and no ``prompt_template`` is given, or the
            rendered text does not contain ``n_images`` image slots (a template without image slot).
    """
    image_token, _ = image_token_of(processor)
    name = type(processor).__name__
    if prompt_template is not None:
        if not isinstance(messages, str):
            raise ValueError("render_prompt: prompt_template renders a single prompt string, not messages")
        text = prompt_template.format(prompt=_strip_image_tokens(messages, image_token))
        where = f"prompt_template {prompt_template!r}"
    else:
        if isinstance(messages, str):
            messages = [user_message(_strip_image_tokens(messages, image_token), n_images)]
        conversation = list(messages)
        if system_prompt is not None:
            conversation = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] + conversation
        template = getattr(processor, "chat_template", None)
        if template is None and getattr(getattr(processor, "tokenizer", None), "chat_template", None) is None:
            raise ValueError(
                f"{name} has no chat template: save one with the processor, or pass prompt_template "
                f"(a format string with {{prompt}} and {n_images} x {image_token!r})"
            )
        text = processor.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        where = f"the chat template of {name}"
    found = text.count(image_token)
    if found != n_images:
        raise ValueError(
            f"{where} has no image slot for this conversation: rendering {n_images} image(s) gave "
            f"{found} {image_token!r} token(s) in {text!r}. Use a chat template that renders "
            "{'type': 'image'} content items, or pass prompt_template"
        )
    return text


@dataclass
class _Unit:
    """One prompt + image set, processed once and shared by the rows that show it."""

    text: str
    images: list[Any]
    key: tuple[Any, ...]


@dataclass
class VLMAdapter:
    """Adapter for ``AutoModelForImageTextToText`` models (``value_kind="sequence"``).

    Args:
        processor: the model's ``AutoProcessor`` (tokenizer + image processor + chat template).
        media_root: folder that relative media paths in the pairs resolve against (the pair dataset folder).
        max_length: maximum row length in tokens (prompt incl. image tokens + response), or None.
        truncation: ``"response"`` cuts over-long responses, ``"drop"`` drops over-long pairs. A pair
            whose prompt alone reaches ``max_length`` is dropped in both modes (image tokens are never cut).
        share_image_encoding: encode a pair's shared images once and reuse the features for both rows.
        append_eos: end each response with the tokenizer's eos token (scored, as TRL does).
        system_prompt: optional system message for every prompt.
        prompt_template: format string with ``{prompt}`` used instead of the chat template.
        lora_scope: which linear layers LoRA adapts when the engine's ``lora_target_modules`` is unset
            (a key of :data:`LORA_SCOPES`; default ``"language"``: the language model only). The engine
            reads :attr:`lora_target_modules`.
        fused_head: log-probs from the last hidden states and the LM head, chunk by chunk, without the
            ``(2B, T, V)`` logits (:func:`mmalign.logprobs.model_sequence_logps`); other heads fall back to
            full logits with a warning. Same values and gradients; ``False`` always makes the logits.
        padding_free: run the ``2B`` rows as one packed row without padding (:mod:`mmalign.packing`):
            position ids restart per sequence (Qwen2-VL/2.5-VL: their 3-D M-RoPE positions of each row,
            with the per-sequence text positions in front, as transformers reads packed M-RoPE input)
            and each sequence attends to itself only (SDPA models switch to per-sequence SDPA). The
            first batch of each model checks once that the packed log-probs equal the padded ones;
            batches with online negatives (which need each row's logits) run padded.

    Batch layout (from :meth:`collate`), ``B`` pairs, ``U`` units (distinct prompt+image sets), ``T`` tokens:
        ``input_ids``, ``attention_mask``, ``labels``: ``(2B, T)``, rows ``[:B]`` chosen, ``[B:]`` rejected;
        ``image_inputs``: the processor's image tensors for the ``U`` units; ``row_units``: ``(2B,)``
        unit of each row; ``unit_image_tokens``: ``(U,)``; ``row_image_index``: per-image index of each
        row's images, in row order (per-pair weights and labels are the engine's, not the adapter's);
        ``ids``: pair ids; ``online_rejected``: ``(B,)`` bool, the pairs with an online negative (their
        rejected row holds the chosen answer on the hacked media); and any of :data:`PER_TOKEN_KEYS`
        the processor returns, ``(2B, T)``.
    """

    processor: Any
    media_root: str | Path | None = None
    max_length: int | None = None
    truncation: str = "response"
    share_image_encoding: bool = True
    append_eos: bool = True
    system_prompt: str | None = None
    prompt_template: str | None = None
    lora_scope: str = "language"
    fused_head: bool = True
    padding_free: bool = False
    value_kind: str = field(default="sequence", init=False)
    dropped: Counter[str] = field(default_factory=Counter, init=False)
    dropped_ids: list[str] = field(default_factory=list, init=False)
    #: How many passes reused the previous pass's image features (see :meth:`_image_features`).
    reused_encodings: int = field(default=0, init=False)
    _feature_slot: tuple[Any, int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_adapter_settings(self)
        self.image_token, self.image_token_id = image_token_of(self.processor)
        self._packing_checked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{type(self.processor).__name__} has no tokenizer")
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError("VLMAdapter: the tokenizer has neither a pad nor an eos token to pad with")

    @property
    def lora_target_modules(self) -> str:
        """peft ``target_modules`` for :attr:`lora_scope` (a regex, or ``"all-linear"``)."""
        return LORA_SCOPES[self.lora_scope]

    # ------------------------------------------------------------------ model checks

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise if ``model`` does not use this processor's image token id (processor/model mismatch)."""
        config = getattr(_unwrap(model), "config", None)
        model_id = getattr(config, "image_token_id", None)
        if model_id is None:
            model_id = getattr(config, "image_token_index", None)
        if model_id is not None and int(model_id) != self.image_token_id:
            raise ValueError(
                f"processor/model mismatch: the processor's image token {self.image_token!r} has id "
                f"{self.image_token_id} but the model expects image_token_id={model_id}; load both from "
                "the same checkpoint folder"
            )

    # ------------------------------------------------------------------ data side

    def _load(self, item: Media, pair: Any, side: str, *, size_only: bool = False) -> Any:
        """Load one media item of ``pair`` as RGB PIL (paths resolved by the core's one rule,
        :func:`mmalign.pairs.pair_media_path`: the pair's own folder, else :attr:`media_root`).

        ``size_only``: a blank RGB image of the item's size, read from the file's header without decoding:
        the processor gives it the same number of image tokens (they depend on the size alone)."""
        from PIL import Image

        from mmalign.pairs import image_size, load_image, pair_media_path

        if isinstance(item, Image.Image):
            if size_only:
                return Image.new("RGB", item.size)
            return item.convert("RGB") if item.mode != "RGB" else item
        path = pair_media_path(pair, item, f"{side}_media", self.media_root)
        try:
            if size_only:
                return Image.new("RGB", image_size(path))
            return load_image(path)
        except ValueError as exc:
            raise ValueError(f"pair {pair.id!r}, field {side}_media: {exc}") from exc

    @staticmethod
    def _media_key(media: Sequence[Media]) -> tuple[Any, ...]:
        return tuple(str(m) if isinstance(m, (str, Path)) else id(m) for m in media)

    def _response_ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def _units_for(self, pair: Any, *, size_only: bool = False) -> tuple[_Unit, _Unit]:
        chosen_media = list(pair.chosen_media or [])
        rejected_media = list(pair.rejected_media or []) or chosen_media  # empty rejected = same images
        online = _online_media(pair)
        if online is not None:  # the rejected row shows the hacked media (scored on the clean row's logits)
            rejected_media = online
        chosen_text = render_prompt(
            self.processor, pair.prompt, len(chosen_media),
            system_prompt=self.system_prompt, prompt_template=self.prompt_template,
        )
        chosen_key = (chosen_text, self._media_key(chosen_media))
        chosen = _Unit(chosen_text, [self._load(m, pair, "chosen", size_only=size_only) for m in chosen_media],
                       chosen_key)
        if self.share_image_encoding and self._media_key(rejected_media) == self._media_key(chosen_media):
            return chosen, chosen
        rejected_text = render_prompt(
            self.processor, pair.prompt, len(rejected_media),
            system_prompt=self.system_prompt, prompt_template=self.prompt_template,
        )
        rejected = _Unit(
            rejected_text, [self._load(m, pair, "rejected", size_only=size_only) for m in rejected_media],
            (rejected_text, self._media_key(rejected_media)),
        )
        return chosen, rejected

    def _process(self, units: list[_Unit]) -> dict[str, Any]:
        has_images = [len(u.images) > 0 for u in units]
        if any(has_images) and not all(has_images):
            raise ValueError("VLMAdapter: a batch mixes pairs with and without images; batch them separately")
        kwargs: dict[str, Any] = {"text": [u.text for u in units], "return_tensors": "pt", "padding": True}
        if all(has_images):
            kwargs["images"] = [u.images for u in units]
        return dict(self.processor(**kwargs))

    def _fit(self, pair: Any, chosen_prompt_len: int, rejected_prompt_len: int) -> tuple[list[int], list[int], str | None]:
        """Response ids of both sides fitted to ``max_length``, and the drop reason (None = keep)."""
        fitted: list[list[int]] = []
        reason = None
        for prompt_len, text in ((chosen_prompt_len, pair.chosen), (rejected_prompt_len, pair.rejected)):
            ids = self._response_ids(text)
            room = None if self.max_length is None else self.max_length - prompt_len
            if room is not None and room < 1:
                reason = "prompt_exceeds_max_length"
            elif room is not None and len(ids) > room:
                if self.truncation == "drop":
                    reason = reason or "response_exceeds_max_length"
                ids = ids[:room]
            fitted.append(ids)
        return fitted[0], fitted[1], reason

    def collate(self, pairs: list[Any]) -> dict[str, Any]:
        """Tokenize and pad ``pairs`` into one batch of ``2B`` rows; see the class docstring for the layout.

        Over-long pairs are truncated in the response or dropped (counted in :attr:`dropped`).

        Raises:
            ValueError: every pair of the batch was dropped, or an image cannot be read.
        """
        planned = [self._units_for(pair) for pair in pairs]
        units: list[_Unit] = []
        unit_of_key: dict[tuple[Any, ...], int] = {}
        if self.share_image_encoding:  # distinct units only (also across pairs)
            for chosen, rejected in planned:
                for unit in (chosen, rejected):
                    if unit.key not in unit_of_key:
                        unit_of_key[unit.key] = len(units)
                        units.append(unit)
            unit_pairs = [(unit_of_key[c.key], unit_of_key[r.key]) for c, r in planned]
        else:  # one unit per row, in row order: all chosen rows, then all rejected rows
            units = [c for c, _ in planned] + [r for _, r in planned]
            unit_pairs = [(i, len(planned) + i) for i in range(len(planned))]
        processed = self._process(units)
        mask = processed["attention_mask"].bool()
        unit_ids = [processed["input_ids"][u][mask[u]] for u in range(len(units))]
        per_token = {k: processed[k] for k in PER_TOKEN_KEYS if k in processed}
        unit_tokens = {k: [v[u][mask[u]] for u in range(len(units))] for k, v in per_token.items()}
        n_image_tokens = [int((ids == self.image_token_id).sum()) for ids in unit_ids]

        kept: list[tuple[Any, int, int, list[int], list[int]]] = []
        for pair, (cu, ru) in zip(pairs, unit_pairs, strict=True):
            chosen_ids, rejected_ids, reason = self._fit(pair, len(unit_ids[cu]), len(unit_ids[ru]))
            if reason is None and _online_media(pair) is not None:
                # the rejected row holds the chosen answer; both rows keep the tokens that fit in both
                room = None if self.max_length is None else self.max_length - len(unit_ids[ru])
                chosen_ids = chosen_ids[:room] if room is not None else chosen_ids
                rejected_ids = chosen_ids
                if not chosen_ids:
                    reason = "prompt_exceeds_max_length"
            if reason is not None:
                self.dropped[reason] += 1
                self.dropped_ids.append(str(pair.id))
                continue
            kept.append((pair, cu, ru, chosen_ids, rejected_ids))
        if not kept:
            raise ValueError(
                f"VLMAdapter.collate: all {len(pairs)} pair(s) of the batch were dropped as too long for "
                f"max_length={self.max_length} (reasons so far: {dict(self.dropped)}); filter the dataset "
                "with VLMAdapter.filter_pairs first or raise max_length"
            )

        order = [(cu, c_ids) for _, cu, _, c_ids, _ in kept] + [(ru, r_ids) for _, _, ru, _, r_ids in kept]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        width = max(len(unit_ids[u]) + len(r) for u, r in order)
        n_rows = len(order)
        input_ids = torch.full((n_rows, width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
        labels = torch.full((n_rows, width), -100, dtype=torch.long)
        token_extra = {k: torch.zeros((n_rows, width), dtype=v.dtype) for k, v in per_token.items()}
        for row, (u, response) in enumerate(order):
            prompt = unit_ids[u]
            p, n = len(prompt), len(response)
            input_ids[row, :p] = prompt
            input_ids[row, p : p + n] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, : p + n] = 1
            labels[row, p : p + n] = input_ids[row, p : p + n]
            for k in token_extra:
                token_extra[k][row, :p] = unit_tokens[k][u]

        # keep only the units some kept row uses (drops can orphan units), renumbered in order
        used_units = sorted({u for u, _ in order})
        renumber = {u: i for i, u in enumerate(used_units)}
        images_per_unit = [len(unit.images) for unit in units]
        image_inputs = {k: v for k, v in processed.items() if k not in _TEXT_KEYS and k not in per_token}
        if len(used_units) != len(units) and image_inputs:
            image_inputs = self._select_units(image_inputs, processed, used_units, images_per_unit)
        image_start: dict[int, int] = {}
        total = 0
        for u in used_units:
            image_start[u] = total
            total += images_per_unit[u]
        row_image_index = [image_start[u] + j for u, _ in order for j in range(images_per_unit[u])]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **token_extra,
            "image_inputs": image_inputs,
            "row_units": torch.tensor([renumber[u] for u, _ in order], dtype=torch.long),
            "row_image_index": torch.tensor(row_image_index, dtype=torch.long),
            "unit_image_tokens": torch.tensor([n_image_tokens[u] for u in used_units], dtype=torch.long),
            "online_rejected": torch.tensor([_online_media(p) is not None for p, *_ in kept], dtype=torch.bool),
            "ids": [str(p.id) for p, *_ in kept],
        }

    @staticmethod
    def _select_units(
        image_inputs: dict[str, Any],
        processed: dict[str, Any],
        used_units: list[int],
        images_per_unit: list[int],
    ) -> dict[str, Any]:
        """Keep the image tensors of ``used_units`` only (after drops); handles per-unit and per-image layouts."""
        n_units = len(images_per_unit)
        n_images = sum(images_per_unit)
        image_rows = [sum(images_per_unit[:u]) + j for u in used_units for j in range(images_per_unit[u])]
        out: dict[str, Any] = {}
        grid = processed.get("image_grid_thw")
        for key, value in image_inputs.items():
            if not isinstance(value, torch.Tensor):
                out[key] = value
            elif key == "pixel_values" and grid is not None:  # Qwen2-VL: patches of all images, flattened
                per_image = grid.prod(-1).tolist()
                starts = [sum(per_image[:i]) for i in range(len(per_image))]
                out[key] = torch.cat([value[starts[i] : starts[i] + per_image[i]] for i in image_rows])
            elif value.shape[0] == n_images and n_images != n_units:
                out[key] = value[image_rows]
            elif value.shape[0] == n_units:
                out[key] = value[used_units]
            elif value.shape[0] == n_images:
                out[key] = value[image_rows]
            else:
                raise ValueError(f"VLMAdapter: cannot select units in processor output {key!r} {tuple(value.shape)}")
        return out

    def filter_pairs(self, pairs: Sequence[Any]) -> tuple[list[Any], Counter[str]]:
        """Drop the pairs :meth:`collate` would drop (too long) before training: ``(kept, reasons)``.

        A no-op without ``max_length``; otherwise runs the processor on each pair's prompt(s) once, with
        blank images of the pairs' image sizes read from the file headers (the image tokens depend on the
        size alone), so no image is decoded here: decoding, and its errors, belong to
        :func:`mmalign.pairs.check_media` before training and to :meth:`collate`.
        """
        if self.max_length is None:
            return list(pairs), Counter()
        kept: list[Any] = []
        reasons: Counter[str] = Counter()
        for pair in pairs:
            chosen, rejected = self._units_for(pair, size_only=True)
            units = [chosen] if chosen is rejected else [chosen, rejected]
            lengths = self._process(units)["attention_mask"].sum(-1).tolist()
            _, _, reason = self._fit(pair, int(lengths[0]), int(lengths[-1]))
            if reason is None:
                kept.append(pair)
            else:
                reasons[reason] += 1
        return kept, reasons

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        """Identity: sequence models draw no per-step randomness."""
        return batch

    # ------------------------------------------------------------------ model side

    def model_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments for ``model(**...)`` on ``batch`` (encodes the distinct images once)."""
        kwargs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "use_cache": False,
        }
        for key in PER_TOKEN_KEYS:
            if key in batch:
                kwargs[key] = batch[key]
        image_inputs = batch.get("image_inputs") or {}
        if not image_inputs:
            return kwargs
        if not self._shares(model):
            n_rows = batch["input_ids"].shape[0]
            if batch["row_units"].tolist() != list(range(n_rows)):
                raise ValueError(
                    "VLMAdapter: this batch was collated with shared image encoding but the model does not "
                    "accept mm_encoder_outputs (transformers < 5?); build the adapter with "
                    "share_image_encoding=False"
                )
            self._check_tokens_per_row(batch, None)
            kwargs.update(image_inputs)
            return kwargs
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        base = _unwrap(model)
        features = self._image_features(base, image_inputs, batch)
        unit_tokens = batch["unit_image_tokens"].tolist()
        if features.shape[0] != sum(unit_tokens):
            raise ValueError(
                f"processor/model mismatch: the prompts hold {sum(unit_tokens)} image tokens "
                f"({self.image_token!r}, per unit {unit_tokens}) but the model's vision encoder gave "
                f"{features.shape[0]} image feature vectors (pairs {batch.get('ids')}); the processor's "
                "image settings (size, patch size, feature strategy) must match the model's config"
            )
        per_unit = list(torch.split(features, unit_tokens))
        kwargs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[per_unit[u] for u in batch["row_units"].tolist()])
        }
        for key in PER_IMAGE_KEYS:
            if key in image_inputs and isinstance(image_inputs[key], torch.Tensor):
                kwargs[key] = image_inputs[key][batch["row_image_index"].to(image_inputs[key].device)]
        self._check_tokens_per_row(batch, per_unit)
        return kwargs

    def _image_features(self, base: Any, image_inputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        """The distinct units' image features, ``(sum of image tokens, hidden)``, computed once per batch.

        The policy's pass encodes the images; a second pass over the *same* batch object by the same
        model (the LoRA-disabled reference, which the engine runs right after the policy) reuses them
        when they cannot differ: the policy's features carry no gradient (vision tower and projector
        frozen) and no LoRA layer sits outside the language model (``lora_scope="language"``, the
        default). The slot holds one batch: a weak reference to its ``input_ids`` tensor, so a new
        batch never matches a freed one's id.
        """
        slot = self._feature_slot
        if slot is not None and slot[0]() is batch["input_ids"] and slot[1] == id(base):
            self.reused_encodings += 1
            return slot[2]
        encoded = base.get_image_features(**image_inputs, return_dict=True)
        pooled = encoded.pooler_output if hasattr(encoded, "pooler_output") else encoded
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled], dim=0) if isinstance(
            pooled, (list, tuple)
        ) else pooled.reshape(-1, pooled.shape[-1])
        reusable = torch.is_grad_enabled() and not features.requires_grad and not lora_outside_language(base)
        self._feature_slot = (weakref.ref(batch["input_ids"]), id(base), features) if reusable else None
        return features

    def _check_tokens_per_row(self, batch: dict[str, Any], per_unit: list[torch.Tensor] | None) -> None:
        counts = (batch["input_ids"] == self.image_token_id).sum(-1).tolist()
        expected = [int(batch["unit_image_tokens"][u]) for u in batch["row_units"].tolist()]
        if counts != expected:
            raise ValueError(
                f"VLMAdapter: image tokens per row {counts} differ from the prompts' {expected}: a response "
                f"contains the image token {self.image_token!r} (pairs {batch.get('ids')})"
            )

    def _shares(self, model: torch.nn.Module) -> bool:
        if not self.share_image_encoding:
            return False
        base = _unwrap(model)
        forward = getattr(getattr(base, "model", base), "forward", None)
        return forward is not None and "mm_encoder_outputs" in inspect.signature(forward).parameters

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        """Summed response log-probs of chosen and rejected rows, ``(B,)`` each, with token counts.

        With ``fused_head`` (default) the ``(2B, T, V)`` logits are never made: log-probs come from the last
        hidden states and the LM head chunk by chunk (:func:`mmalign.logprobs.model_sequence_logps`; heads it
        cannot fuse fall back to full logits with a warning). A batch with online negatives needs the hacked
        rows' argmax over the vocabulary, so it runs with full logits.
        """
        kwargs = self.model_inputs(model, batch)
        online = batch.get("online_rejected")
        has_online = online is not None and bool(online.any())
        logits = None
        try:
            if self.padding_free and not has_online:
                logps, n_tokens = self._packed_logps(model, batch, kwargs)
            elif self.fused_head and not has_online:
                logps, n_tokens = model_sequence_logps(model, batch["labels"], fused=True, **kwargs)
            else:
                logits = model(**kwargs).logits
                logps, n_tokens = sequence_logps(logits, batch["labels"])
        except (ValueError, RuntimeError) as exc:
            if is_image_token_mismatch(exc):
                raise ValueError(
                    f"processor/model mismatch on pairs {batch.get('ids')}: {exc}. Load the processor and the "
                    "model from the same folder"
                ) from exc
            raise
        n_pairs = logps.shape[0] // 2
        rejected = logps[n_pairs:]
        if has_online:
            rejected = self._online_rejected(logits, batch["labels"], online.to(logits.device), rejected)
        return ChosenRejected(
            chosen=logps[:n_pairs],
            rejected=rejected,
            chosen_tokens=n_tokens[:n_pairs],
            rejected_tokens=n_tokens[n_pairs:],
        )

    def _packed_inputs(self, model: torch.nn.Module, batch: dict[str, Any],
                       kwargs: dict[str, Any]) -> tuple[dict[str, Any], Packed]:
        """``kwargs`` of the padded batch turned into one padding-free row (see ``padding_free``)."""
        mask = batch["attention_mask"]
        packed = pack_rows(batch["input_ids"], mask, batch["labels"])
        real = mask.bool()
        out = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        out["input_ids"] = packed.input_ids
        for key in PER_TOKEN_KEYS:
            if key in out:
                out[key] = out[key][real][None]
        rope = _rope_index(model)
        if rope is None:
            out["position_ids"] = packed.position_ids
            return out, packed
        params = inspect.signature(rope).parameters
        given = {"input_ids": batch["input_ids"], "attention_mask": mask, **{
            k: kwargs[k] for k in ("mm_token_type_ids", "image_grid_thw") if k in kwargs}}
        positions, _ = rope(**{k: v for k, v in given.items() if k in params})
        # (3, R, T) M-RoPE positions of the padded rows -> (3, N) of the real tokens; the text positions
        # (restarting per sequence) go in front: transformers builds the packed mask from that row.
        out["position_ids"] = torch.cat([packed.position_ids, positions[:, real]], dim=0)[:, None]
        return out, packed

    def _packed_logps(self, model: torch.nn.Module, batch: dict[str, Any],
                      kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        first = model not in self._packing_checked
        if first:
            use_varlen_sdpa(_unwrap(model))  # SDPA: attend per packed sequence, not over a dense (N, N) mask
        inputs, packed = self._packed_inputs(model, batch, kwargs)
        per_token, _ = model_token_logps(model, packed.labels, fused=self.fused_head, **inputs)
        logps = packed.row_sums(per_token)
        if first:
            self._check_packing(model, batch, kwargs)
            self._packing_checked.add(model)
        return logps, (batch["labels"][:, 1:] != -100).sum(dim=-1)

    def _check_packing(self, model: torch.nn.Module, batch: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Once per model: the packed log-probs must equal the padded batch's (else a ValueError).

        Both run without gradient in eval mode (no dropout), so only the packing can make them differ.
        """
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                padded, _ = model_sequence_logps(model, batch["labels"], fused=self.fused_head, **kwargs)
                inputs, packed = self._packed_inputs(model, batch, kwargs)
                logps = packed.row_sums(model_token_logps(model, packed.labels, fused=self.fused_head, **inputs)[0])
        finally:
            model.train(was_training)
        tol = 1e-4 if logps.dtype == torch.float32 else 2e-2  # relative to the largest |log-prob| (a sum)
        err = (logps - padded).abs().max().item()
        if err > tol * max(1.0, padded.abs().max().item()):
            raise ValueError(
                f"padding_free=True: {type(_unwrap(model)).__name__} gives packed log-probs that differ from the "
                f"padded ones by {err:.3g}; its attention does not honour packed position ids. Use "
                "padding_free=False"
            )

    @staticmethod
    def _online_rejected(
        logits: torch.Tensor, labels: torch.Tensor, online: torch.Tensor, rejected: torch.Tensor
    ) -> torch.Tensor:
        """Rejected values of the online pairs: the hacked row's top tokens scored by the clean chosen row.

        For pair ``i`` (chosen row ``i``, hacked row ``B + i``, same answer tokens), at each answer
        position the hacked row's argmax token (no gradient) becomes the label of the chosen row, and
        :func:`~mmalign.logprobs.sequence_logps` on the chosen rows' logits gives
        ``sum_t log p_clean(argmax_v p_hacked(v | y_<t) | y_<t)``, differentiable through the clean logits.
        """
        n_pairs = labels.shape[0] // 2
        derived = torch.full_like(labels[:n_pairs], -100)
        with torch.no_grad():
            for i in online.nonzero().flatten().tolist():
                chosen_pos = (labels[i, 1:] != -100).nonzero().flatten() + 1
                hacked_pos = (labels[n_pairs + i, 1:] != -100).nonzero().flatten() + 1
                if chosen_pos.numel() != hacked_pos.numel():
                    raise ValueError(f"online negative of pair {i}: {chosen_pos.numel()} chosen tokens but "
                                     f"{hacked_pos.numel()} on the hacked row")
                derived[i, chosen_pos] = logits[n_pairs + i, hacked_pos - 1].argmax(-1)
        values, _ = sequence_logps(logits[:n_pairs], derived)
        return torch.where(online, values.to(rejected.dtype), rejected)


def check_adapter_settings(adapter: Any) -> None:
    """The settings the image and video adapters share: ``truncation``, ``max_length``, ``lora_scope``."""
    name = type(adapter).__name__
    if adapter.truncation not in ("response", "drop"):
        raise ValueError(f"{name}: truncation must be 'response' or 'drop', got {adapter.truncation!r}")
    if adapter.max_length is not None and adapter.max_length < 2:
        raise ValueError(f"{name}: max_length must be >= 2 or None, got {adapter.max_length}")
    if adapter.lora_scope not in LORA_SCOPES:
        raise ValueError(f"{name}: lora_scope must be one of {sorted(LORA_SCOPES)}, got {adapter.lora_scope!r}")


def _unwrap(model: torch.nn.Module) -> Any:
    """The model behind a DDP-style wrapper (``.module``); peft models forward attributes themselves."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
        "DistributedDataParallel",
        "FullyShardedDataParallel",
    ):
        model = model.module
    return model


def lora_outside_language(base: Any) -> bool:
    """Whether any peft LoRA layer of ``base`` sits outside its language model (vision tower, projector).

    Such a layer makes the image features differ between the policy and its LoRA-disabled reference. A
    model whose language model cannot be found counts as having one (nothing is reused).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no LoRA layers at all
        return False
    inner = base.get_base_model() if hasattr(base, "get_base_model") else base
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None:
        return True
    inside = {id(m) for m in decoder.modules()}
    return any(isinstance(m, BaseTunerLayer) and id(m) not in inside for m in inner.modules())


def _rope_index(model: torch.nn.Module) -> Any:
    """The model's multimodal ``get_rope_index`` (Qwen2-VL/2.5-VL M-RoPE), or None for 1-D positions."""
    base = _unwrap(model)
    inner = base.get_base_model() if hasattr(base, "get_base_model") else base
    return getattr(getattr(inner, "model", None), "get_rope_index", None)
