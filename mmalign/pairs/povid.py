"""POVID preference records (LLaVA style or flat) to pairs."""

from __future__ import annotations

import os
from typing import Any

from mmalign.pairs.convert import (
    _convert,
    _json_scalars,
    _MediaSink,
    _record_id,
    _require,
    _same_media_pair,
    _strip_image_token,
)
from mmalign.pairs.errors import ConversionReport, PairFormatError
from mmalign.pairs.record import PreferencePair, _check_str

__all__ = ["from_povid"]


def _llava_turns(conv: Any, name: str) -> tuple[str, str]:
    """(question, answer) of a single-turn LLaVA conversation ``[{"from": "human"}, {"from": "gpt"}]``."""
    if not isinstance(conv, list) or len(conv) != 2:
        raise PairFormatError(
            "expected one human turn and one gpt turn (multi-turn is not supported)", field=name
        )
    roles = [t.get("from") if isinstance(t, dict) else None for t in conv]
    if roles != ["human", "gpt"]:
        raise PairFormatError(f"expected turns from ['human', 'gpt'], got {roles}", field=name)
    return _check_str(conv[0].get("value"), f"{name}[0].value"), _check_str(
        conv[1].get("value"), f"{name}[1].value"
    )


def from_povid(
    src: Any,
    out: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str],
    skip_bad: bool = False,
    overwrite: bool = False,
    verify_images: bool = True,
    durable: bool = True,
) -> ConversionReport:
    """Convert POVID preference records to pairs. Two layouts are accepted per record:

    * LLaVA style (POVID's ``train_dpo.py``): ``image``, ``conversations`` =
      ``[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": A_chosen}]`` and
      ``rejected_conversations`` with the same human turn and the rejected answer;
    * flat: ``image``, ``prompt`` (or ``question``), ``chosen``, ``rejected`` strings.

    ``image`` is relative to ``image_root``; it becomes both sides' media (POVID's image-side
    negative, the diffusion-noised image, is made at training time: see ``mmalign.corruptions``).
    ``<image>`` tokens are removed from the prompt.
    """

    def make(rec: dict[str, Any], lineno: int, sink: _MediaSink) -> PreferencePair:
        image = _require(rec, "image")
        if "conversations" in rec:
            question, chosen = _llava_turns(rec["conversations"], "conversations")
            rejected_q, rejected = _llava_turns(
                _require(rec, "rejected_conversations"), "rejected_conversations"
            )
            if rejected_q != question:
                raise PairFormatError(
                    "the human turn differs from the one in conversations", field="rejected_conversations"
                )
            layout = "llava"
        else:
            key = "prompt" if rec.get("prompt") is not None else "question"
            question = _check_str(_require(rec, key), key)
            chosen = _check_str(_require(rec, "chosen"), "chosen")
            rejected = _check_str(_require(rec, "rejected"), "rejected")
            layout = "flat"
        prompt, n_tokens = _strip_image_token(question)
        media = [sink.store(image, "image")]
        meta: dict[str, Any] = {"source": "povid", "layout": layout, "image": str(image)}
        if n_tokens:
            meta["image_tokens_removed"] = n_tokens
        meta.update(
            _json_scalars(
                rec,
                (
                    "image",
                    "conversations",
                    "rejected_conversations",
                    "prompt",
                    "question",
                    "chosen",
                    "rejected",
                    "id",
                ),
            )
        )
        return _same_media_pair(_record_id(rec, lineno, "povid"), prompt, chosen, rejected, media, meta)

    return _convert(src, out, make, name="povid", image_root=image_root, skip_bad=skip_bad,
                    overwrite=overwrite, verify_images=verify_images, durable=durable)
