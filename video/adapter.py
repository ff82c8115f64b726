"""The sequence adapter for video LLMs (``AutoModelForImageTextToText`` + ``AutoProcessor`` with ``videos=``).

:class:`VideoLLMAdapter` turns :class:`~mmalign.pairs.PreferencePair` records whose media are videos into one
padded batch of ``2B`` rows (chosen rows first, then rejected rows) and returns the summed response-token
log-probs of each row (:func:`mmalign.logprobs.sequence_logps`). Families covered by tests, each with a tiny
model from :mod:`mmalign.tiny` loaded through ``from_pretrained``: LLaVA-NeXT-Video (``<video>`` token,
2x2 average-pooled frame features), LLaVA-OneVision (``<video>``, bilinear pooling + one newline token per
video), Qwen2-VL and Qwen2.5-VL (``<|video_pad|>``; ``pixel_values_videos``, ``video_grid_thw``, temporal
patch 2 so frames come in pairs, and for 2.5 ``second_per_grid_ts`` from the clip's sampled fps).

* **A side's media is one video**: a video file, or a list of frame images (in order). ``rejected_media``
  may name other frames than ``chosen_media`` (fewer frames, another clip); empty means "same as chosen".
  ``pair.meta["sampling"] = {"rejected": {"num_frames": 4}}`` samples one side differently from the
  adapter's :class:`~video.frames.FrameSampling`.
* **A shared video is encoded once per pair** (and once per batch when several pairs show the same clip with
  the same prompt): each distinct (prompt, frames) *unit* is processed once, its video features computed
  once by the model's ``get_video_features``, and handed to both rows through ``mm_encoder_outputs``
  (transformers >= 5). Clips are decoded once per pass through a :class:`~video.frames.FrameCache`.
* **Video tokens are never truncated**: the prompt with its expanded video tokens is kept whole; an
  over-long pair has its response cut (``truncation="response"``) or is dropped (``"drop"``); a pair whose
  prompt alone does not fit is always dropped. Drops are counted by reason in :attr:`VideoLLMAdapter.dropped`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.adapter import ChosenRejected
from mmalign.logprobs import sequence_logps
from video.frames import Clip, FrameCache, FrameSampling, pair_media, pair_sampling
from vision.adapter import PER_TOKEN_KEYS, VLMAdapter, _unwrap, check_adapter_settings, lora_outside_language

__all__ = ["PER_VIDEO_KEYS", "VIDEO_INPUT_KEYS", "VideoLLMAdapter", "render_video_prompt", "video_token_of"]

#: Processor outputs that carry the pixels of each video (encoded once per unit).
VIDEO_INPUT_KEYS: tuple[str, ...] = ("pixel_values_videos", "video_grid_thw")
#: Processor outputs with one row per video that the model also needs *after* encoding (M-RoPE positions).
PER_VIDEO_KEYS: tuple[str, ...] = ("video_grid_thw", "second_per_grid_ts")


def video_token_of(processor: Any) -> tuple[str, int]:
    """The video placeholder token of ``processor`` and its id, e.g. ``("<video>", 667)``.

    Raises:
        ValueError: the processor defines no video token (not a video-LLM processor).
    """
    token = getattr(processor, "video_token", None)
    if token is None or getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no `video_token`/`video_processor`: not a video-LLM processor "
            "(load it with AutoProcessor from the model folder)"
        )
    token_id = getattr(processor, "video_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return str(token), int(token_id)


def render_video_prompt(
    processor: Any,
    prompt: str,
    *,
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """One user turn with a video slot and ``prompt``, rendered by the processor's chat template.

    Literal video placeholders in ``prompt`` (``"<video>\\n"``, as LLaVA-Hound's data writes them) are removed.

    Raises:
        ValueError: no chat template, or the rendered text has no single video slot.
    """
    token, _ = video_token_of(processor)
    prompt = prompt.replace(token + "\n", "").replace(token, "").replace("<video>\n", "").replace("<video>", "").strip()
    content = [{"type": "video"}, {"type": "text", "text": prompt}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{type(processor).__name__} has no chat template: save one with the processor")
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    if text.count(token) != 1:
        raise ValueError(
            f"the chat template of {type(processor).__name__} rendered {text.count(token)} {token!r} tokens for one "
            f"video in {text!r}; use a template that renders {{'type': 'video'}} content items"
        )
    return text


@dataclass
class _Unit:
    """One prompt + clip, processed once and shared by the rows that show it; ``video`` keys its clip."""

    text: str
    clip: Clip
    key: tuple[Any, ...]
    video: tuple[Any, ...]


@dataclass
class VideoLLMAdapter:
    """Adapter for video LLMs (``value_kind="sequence"``); see the module docstring.

    Args:
        processor: the model's ``AutoProcessor`` (tokenizer + video processor + chat template).
        media_root: folder relative media paths resolve against when a pair has no ``root``.
        sampling: which frames of each video to use (default 16 uniform frames).
        max_length: maximum row length in tokens (prompt incl. video tokens + response), or None.
        truncation: ``"response"`` cuts over-long responses, ``"drop"`` drops over-long pairs.
        append_eos: end each response with the tokenizer's eos token (scored, as TRL does).
        system_prompt: optional system message for every prompt.
        lora_scope: which linear layers LoRA adapts when the engine's ``lora_target_modules`` is unset
            (a key of :data:`vision.adapter.LORA_SCOPES`).
        cache: the frame cache (one per adapter, i.e. per dataset).

    Batch layout (from :meth:`collate`), ``B`` pairs, ``T`` tokens:
        ``input_ids``, ``attention_mask``, ``labels``: ``(2B, T)``, rows ``[:B]`` chosen, ``[B:]`` rejected;
        ``video_inputs``: the processor's tensors of each of the ``V`` distinct clips; ``row_videos``:
        ``(2B,)`` clip of each row; ``video_tokens``: ``(V,)`` video tokens per clip; ``weight``: ``(B,)`` from ``meta["weight"]`` (default 1);
        ``ids``: pair ids; and any of ``PER_TOKEN_KEYS`` the processor returns, ``(2B, T)``.
    """

    processor: Any
    media_root: str | Path | None = None
    sampling: FrameSampling = field(default_factory=FrameSampling)
    max_length: int | None = None
    truncation: str = "response"
    append_eos: bool = True
    system_prompt: str | None = None
    lora_scope: str = "language"
    cache: FrameCache = field(default_factory=FrameCache)
    value_kind: str = field(default="sequence", init=False)
    dropped: Counter[str] = field(default_factory=Counter, init=False)
    dropped_ids: list[str] = field(default_factory=list, init=False)
    #: How many passes reused the previous pass's video features (see :meth:`_reused_or_encoded`).
    reused_encodings: int = field(default=0, init=False)
    _feature_slot: tuple[Any, int, list[torch.Tensor], bool] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_adapter_settings(self)
        self.video_token, self.video_token_id = video_token_of(self.processor)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError("VideoLLMAdapter: the tokenizer has neither a pad nor an eos token to pad with")

    lora_target_modules = VLMAdapter.lora_target_modules  # peft target_modules for lora_scope

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise if ``model`` does not use this processor's video token id (processor/model mismatch)."""
        config = getattr(_unwrap(model), "config", None)
        model_id = getattr(config, "video_token_id", None)
        if model_id is None:
            model_id = getattr(config, "video_token_index", None)
        if model_id is None:
            raise ValueError(f"{type(_unwrap(model)).__name__} has no video_token_id: not a video LLM")
        if int(model_id) != self.video_token_id:
            raise ValueError(
                f"processor/model mismatch: the processor's video token {self.video_token!r} has id "
                f"{self.video_token_id} but the model expects video_token_id={model_id}; load both from the "
                "same checkpoint folder"
            )

    # ------------------------------------------------------------------ data side

    def _paths(self, pair: Any, side: str) -> list[Path]:
        return pair_media(pair, side, self.media_root)

    def _sampling(self, pair: Any, side: str) -> FrameSampling:
        """The adapter's sampling, or the pair's ``meta["sampling"][side]`` (:func:`video.frames.pair_sampling`)."""
        return pair_sampling(pair, side, self.sampling)

    def clip(self, pair: Any, side: str) -> Clip:
        """The sampled frames of ``pair``'s ``side`` (``"chosen"``/``"rejected"``), through the cache."""
        paths = self._paths(pair, side)
        try:
            return self.cache.get(paths if len(paths) > 1 else paths[0], self._sampling(pair, side))
        except ValueError as exc:
            raise ValueError(f"pair {pair.id!r}, field {side}_media: {exc}") from exc

    def _units_for(self, pair: Any) -> tuple[_Unit, _Unit]:
        text = render_video_prompt(self.processor, pair.prompt, system_prompt=self.system_prompt)
        units = []
        for side in ("chosen", "rejected"):
            video = (tuple(str(p) for p in self._paths(pair, side)), self._sampling(pair, side))
            units.append(_Unit(text, self.clip(pair, side), (text, video), video))
        return units[0], units[1]

    def _process(self, unit: _Unit) -> dict[str, Any]:
        # the frames are sampled already: a checkpoint whose video processor samples by default must not resample
        return dict(
            self.processor(
                text=[unit.text], videos=[unit.clip.frames], video_metadata=[unit.clip.metadata()],
                do_sample_frames=False, return_tensors="pt",
            )
        )

    # The same response fitting as the image adapter (reads max_length, truncation, append_eos, tokenizer):
    # the response is cut or the pair dropped, the prompt with its media tokens never.
    _response_ids = VLMAdapter._response_ids
    _fit = VLMAdapter._fit

    def collate(self, pairs: list[Any]) -> dict[str, Any]:
        """Tokenize and pad ``pairs`` into one batch of ``2B`` rows; see the class docstring for the layout.

        Raises:
            ValueError: every pair of the batch was dropped, or a video cannot be read.
        """
        units: list[_Unit] = []
        processed: list[dict[str, Any]] = []
        unit_of_key: dict[tuple[Any, ...], int] = {}
        planned: list[tuple[int, int]] = []
        for pair in pairs:
            ids = []
            for unit in self._units_for(pair):
                if unit.key not in unit_of_key:
                    unit_of_key[unit.key] = len(units)
                    units.append(unit)
                    processed.append(self._process(unit))
                ids.append(unit_of_key[unit.key])
            planned.append((ids[0], ids[1]))
        unit_ids = [p["input_ids"][0] for p in processed]

        kept: list[tuple[Any, int, int, list[int], list[int]]] = []
        for pair, (cu, ru) in zip(pairs, planned, strict=True):
            chosen_ids, rejected_ids, reason = self._fit(pair, len(unit_ids[cu]), len(unit_ids[ru]))
            if reason is not None:
                self.dropped[reason] += 1
                self.dropped_ids.append(str(pair.id))
                continue
            kept.append((pair, cu, ru, chosen_ids, rejected_ids))
        if not kept:
            raise ValueError(
                f"VideoLLMAdapter.collate: all {len(pairs)} pair(s) of the batch were dropped as too long for "
                f"max_length={self.max_length} (reasons so far: {dict(self.dropped)}); filter the dataset with "
                "VideoLLMAdapter.filter_pairs first, use fewer frames, or raise max_length"
            )
        order = [(cu, c) for _, cu, _, c, _ in kept] + [(ru, r) for _, _, ru, _, r in kept]
        # one entry per distinct clip the kept rows show (a clip shown with two prompts is encoded once)
        video_of_key: dict[tuple[Any, ...], int] = {}
        video_units: list[int] = []
        for u, _ in order:
            if units[u].video not in video_of_key:
                video_of_key[units[u].video] = len(video_units)
                video_units.append(u)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(unit_ids[u]) + len(r) for u, r in order)
        n_rows = len(order)
        input_ids = torch.full((n_rows, width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
        labels = torch.full((n_rows, width), -100, dtype=torch.long)
        token_keys = [k for k in PER_TOKEN_KEYS if k in processed[0]]
        token_extra = {k: torch.zeros((n_rows, width), dtype=processed[0][k].dtype) for k in token_keys}
        for row, (u, response) in enumerate(order):
            prompt = unit_ids[u]
            p, n = len(prompt), len(response)
            input_ids[row, :p] = prompt
            input_ids[row, p : p + n] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, : p + n] = 1
            labels[row, p : p + n] = input_ids[row, p : p + n]
            for k in token_keys:
                token_extra[k][row, :p] = processed[u][k][0]
        skip = {"input_ids", "attention_mask", *token_keys}
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **token_extra,
            "video_inputs": [{k: v for k, v in processed[u].items() if k not in skip} for u in video_units],
            "row_videos": torch.tensor([video_of_key[units[u].video] for u, _ in order], dtype=torch.long),
            "video_tokens": torch.tensor(
                [int((unit_ids[u] == self.video_token_id).sum()) for u in video_units], dtype=torch.long
            ),
            "weight": torch.tensor([float((p.meta or {}).get("weight", 1.0)) for p, *_ in kept]),
            "ids": [str(p.id) for p, *_ in kept],
        }

    def filter_pairs(self, pairs: Sequence[Any]) -> tuple[list[Any], Counter[str]]:
        """Drop the pairs :meth:`collate` would drop (too long) before training: ``(kept, reasons)``."""
        if self.max_length is None:
            return list(pairs), Counter()
        kept: list[Any] = []
        reasons: Counter[str] = Counter()
        for pair in pairs:
            chosen, rejected = self._units_for(pair)
            lengths = [len(self._process(u)["input_ids"][0]) for u in (chosen, rejected)]
            _, _, reason = self._fit(pair, lengths[0], lengths[1])
            if reason is None:
                kept.append(pair)
            else:
                reasons[reason] += 1
        return kept, reasons

    def prepare(self, batch: dict[str, Any], *, generator: torch.Generator) -> dict[str, Any]:
        """Identity: sequence models draw no per-step randomness."""
        return batch

    # ------------------------------------------------------------------ model side

    def _encode_videos(self, model: torch.nn.Module, video_inputs: list[dict[str, Any]]) -> tuple[list[torch.Tensor], bool]:
        """Features of each clip, ``(tokens_v, D)`` each, and whether the model's pooler is a sequence.

        Clips whose pixel tensors can be batched (Qwen's flattened patches with their grids; LLaVA frame stacks of
        equal shape) go through ``get_video_features`` together.
        """
        base = _unwrap(model)
        encode = getattr(base, "get_video_features", None) or base.model.get_video_features
        groups: dict[Any, list[int]] = {}
        for u, inputs in enumerate(video_inputs):
            pixels = inputs["pixel_values_videos"]
            key = "flat" if "video_grid_thw" in inputs else tuple(pixels.shape[1:])
            groups.setdefault(key, []).append(u)
        features: list[torch.Tensor | None] = [None] * len(video_inputs)
        pooled_is_sequence = False
        for members in groups.values():
            kwargs = {
                k: torch.cat([video_inputs[u][k] for u in members]) for k in VIDEO_INPUT_KEYS if k in video_inputs[members[0]]
            }
            pooled = encode(**kwargs, return_dict=True).pooler_output
            pooled_is_sequence = isinstance(pooled, list | tuple)
            for u, f in zip(members, pooled, strict=True):
                features[u] = f.reshape(-1, f.shape[-1])
        return [f for f in features if f is not None], pooled_is_sequence

    def _reused_or_encoded(self, model: torch.nn.Module, batch: dict[str, Any],
                           video_inputs: list[dict[str, Any]]) -> tuple[list[torch.Tensor], bool]:
        """:meth:`_encode_videos`, or the previous pass's features for the same batch and model.

        The LoRA-disabled reference runs right after the policy on the same batch object; when the video
        features carry no gradient (frozen tower and projector) and no LoRA layer sits outside the language
        model, they are the ones the reference would compute, so the reference takes them (one video-tower
        pass per step instead of two; :attr:`reused_encodings` counts it). One batch is held, by a weak
        reference to its ``input_ids``.
        """
        base = _unwrap(model)
        slot = self._feature_slot
        if slot is not None and slot[0]() is batch["input_ids"] and slot[1] == id(base):
            self.reused_encodings += 1
            return slot[2], slot[3]
        per_video, pooled_is_sequence = self._encode_videos(model, video_inputs)
        reusable = (torch.is_grad_enabled() and not any(f.requires_grad for f in per_video)
                    and not lora_outside_language(base))
        self._feature_slot = (weakref.ref(batch["input_ids"]), id(base), per_video, pooled_is_sequence) if reusable else None
        return per_video, pooled_is_sequence

    def model_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for ``model(**...)``: each distinct video encoded once, features handed to its rows."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        device = batch["input_ids"].device
        video_inputs = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in u.items()} for u in batch["video_inputs"]
        ]
        per_video, pooled_is_sequence = self._reused_or_encoded(model, batch, video_inputs)
        expected = batch["video_tokens"].tolist()
        got = [int(f.shape[0]) for f in per_video]
        if got != expected:
            raise ValueError(
                f"processor/model mismatch: the prompts hold {expected} video tokens ({self.video_token!r}) per clip but "
                f"the model's video encoder gave {got} feature vectors (pairs {batch.get('ids')}); the processor's "
                "video settings (size, patch size, pooling) must match the model's config"
            )
        rows = batch["row_videos"].tolist()
        counts = (batch["input_ids"] == self.video_token_id).sum(-1).tolist()
        if counts != [expected[u] for u in rows]:
            raise ValueError(
                f"VideoLLMAdapter: video tokens per row {counts} differ from the prompts' {[expected[u] for u in rows]}: "
                f"a response contains the video token {self.video_token!r} (pairs {batch.get('ids')})"
            )
        features = torch.cat([per_video[v] for v in rows])
        # the model's forward reads the pooler as it produced it: a tuple (Qwen) or a stacked tensor (LLaVA)
        pooled = (features,) if pooled_is_sequence else features[None]
        kwargs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "use_cache": False,
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=pooled)},
        }
        for key in PER_TOKEN_KEYS:
            if key in batch:
                kwargs[key] = batch[key]
        for key in PER_VIDEO_KEYS:
            if key in video_inputs[0]:
                kwargs[key] = torch.cat([video_inputs[v][key] for v in rows])
        return kwargs

    def logps(self, model: torch.nn.Module, batch: dict[str, Any]) -> ChosenRejected:
        """Summed response log-probs of chosen and rejected rows, ``(B,)`` each, with token counts."""
        logits = model(**self.model_inputs(model, batch)).logits
        logps, n_tokens = sequence_logps(logits, batch["labels"])
        n_pairs = logps.shape[0] // 2
        return ChosenRejected(
            chosen=logps[:n_pairs],
            rejected=logps[n_pairs:],
            chosen_tokens=n_tokens[:n_pairs],
            rejected_tokens=n_tokens[n_pairs:],
        )
