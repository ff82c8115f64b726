"""TRL preference records (standard, conversational, implicit prompt; shared images) to and from pairs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from mmalign.pairs.convert import (
    _check_messages,
    _convert,
    _json_scalars,
    _MediaSink,
    _record_id,
    _require,
    _response_text,
    _same_media_pair,
    flatten_messages,
)
from mmalign.pairs.errors import ConversionReport, PairFormatError
from mmalign.pairs.media import load_image, resolve_media
from mmalign.pairs.record import PreferencePair

__all__ = ["from_trl", "to_trl"]


def from_trl(
    src: Any,
    out: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    verify_images: bool = True,
    durable: bool = True,
) -> ConversionReport:
    """Convert TRL preference records into a pair dataset folder ``out``.

    Accepted records (``src``: list of dicts, HF dataset, .jsonl/.json/.parquet path):

    * standard: ``prompt``, ``chosen``, ``rejected`` strings;
    * conversational: message lists (``{"role", "content"}``, content a string or typed parts);
      the prompt is flattened with :func:`flatten_messages` (multi-message prompts are also kept
      in ``meta["prompt_messages"]``), responses must be assistant turns (texts joined by ``\\n``);
    * implicit prompt (no ``prompt``): ``chosen``/``rejected`` message lists whose turns before
      the last must be equal: they are the prompt, the last turns are the responses;
    * ``images`` (list) or ``image``: bytes, ``{"bytes","path"}``, PIL, arrays or paths relative
      to ``image_root``; TRL shares them, so they become both ``chosen_media`` and
      ``rejected_media``. Image placeholders in the prompt must match the number of images.
    """

    def make(rec: dict[str, Any], lineno: int, sink: _MediaSink) -> PreferencePair:
        chosen_raw = _require(rec, "chosen")
        rejected_raw = _require(rec, "rejected")
        meta: dict[str, Any] = {"source": "trl"}
        if "prompt" in rec and rec["prompt"] is not None:
            prompt_raw = rec["prompt"]
        elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
            _check_messages(chosen_raw, "chosen")
            _check_messages(rejected_raw, "rejected")
            if len(chosen_raw) < 2 or chosen_raw[:-1] != rejected_raw[:-1]:
                raise PairFormatError(
                    "implicit prompt: chosen and rejected must share every turn but the last",
                    field="rejected",
                )
            prompt_raw, chosen_raw, rejected_raw = chosen_raw[:-1], chosen_raw[-1:], rejected_raw[-1:]
        else:
            raise PairFormatError(
                "missing required field (implicit prompts are only supported for message lists)",
                field="prompt",
            )
        if isinstance(prompt_raw, str):
            prompt, placeholders = prompt_raw, 0
        else:
            prompt, placeholders = flatten_messages(_check_messages(prompt_raw, "prompt"))
            if len(prompt_raw) > 1:
                meta["prompt_messages"] = prompt_raw
        chosen = _response_text(chosen_raw, "chosen")
        rejected = _response_text(rejected_raw, "rejected")
        images_raw = rec.get("images")
        key = "images"
        if images_raw is None and rec.get("image") is not None:
            images_raw, key = [rec["image"]], "image"
        images_raw = [] if images_raw is None else images_raw
        if not isinstance(images_raw, list | tuple):
            raise PairFormatError("must be a list of images", field=key)
        if placeholders and placeholders != len(images_raw):
            raise PairFormatError(
                f"prompt has {placeholders} image placeholder(s) but {len(images_raw)} image(s)", field=key
            )
        media = [sink.store(img, f"{key}[{i}]") for i, img in enumerate(images_raw)]
        meta.update(_json_scalars(rec, ("prompt", "chosen", "rejected", "images", "image", "id")))
        return _same_media_pair(_record_id(rec, lineno, "trl"), prompt, chosen, rejected, media, meta)

    return _convert(src, out, make, name="trl", image_root=image_root, skip_bad=skip_bad,
                    overwrite=overwrite, verify_images=verify_images, durable=durable)


def to_trl(
    pairs: Iterable[PreferencePair],
    root: str | os.PathLike[str] | None = None,
    *,
    images: Literal["path", "pil"] = "path",
) -> list[dict[str, Any]]:
    """TRL standard records ``{"prompt", "chosen", "rejected"[, "images"]}``.

    TRL shares one image list between both sides and has no ties, so a pair with different
    chosen/rejected media or ``label != 1`` raises (naming the item). ``images="path"`` gives
    absolute path strings, ``"pil"`` loads them with :func:`load_image`. ``root`` defaults to
    each pair's :attr:`PreferencePair.root`.
    """
    out = []
    for i, pair in enumerate(pairs, start=1):
        pair = pair.oriented()
        if pair.label != 1.0:
            raise PairFormatError(
                f"pair {pair.id!r} has label {pair.label} (a tie); TRL has no ties: filter them first",
                source="<to_trl>",
                line=i,
                field="label",
                unit="item",
            )
        if pair.chosen_media != pair.rejected_media:
            raise PairFormatError(
                f"pair {pair.id!r} has different chosen and rejected media; TRL shares images",
                source="<to_trl>",
                line=i,
                field="rejected_media",
                unit="item",
            )
        rec: dict[str, Any] = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
        if pair.chosen_media:
            base = Path(root) if root is not None else pair.root
            if base is None:
                raise ValueError(f"pair {pair.id!r} has media but no root folder; pass root=")
            paths = [resolve_media(base, r) for r in pair.chosen_media]
            rec["images"] = [load_image(p) for p in paths] if images == "pil" else [str(p) for p in paths]
        out.append(rec)
    return out
