"""STIC stage-1 preference records (``stic/generate_pref.py`` output) to pairs."""

from __future__ import annotations

import os
from typing import Any

from mmalign.pairs.convert import (
    _check_messages,
    _convert,
    _MediaSink,
    _record_id,
    _require,
    _response_text,
    _same_media_pair,
    _strip_image_token,
    flatten_messages,
)
from mmalign.pairs.errors import ConversionReport, PairFormatError
from mmalign.pairs.record import PreferencePair, _check_str

__all__ = ["from_stic"]


def from_stic(
    src: Any,
    out: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str],
    skip_bad: bool = False,
    overwrite: bool = False,
    verify_images: bool = True,
    durable: bool = True,
) -> ConversionReport:
    """Convert STIC stage-1 preference records (``stic/generate_pref.py`` output) to pairs.

    Assumed layout, one JSON object per line::

        {"image": "COCO_train2014_000000000009.jpg",      # relative to image_root (STIC's --image-dir)
         "image_corruption": false, "hallu_prompt": "...",
         "chosen":   [{"role": "user", "content": P}, {"role": "assistant", "content": A_good}],
         "rejected": [{"role": "user", "content": P}, {"role": "assistant", "content": A_bad}]}

    The user turns must be identical (they are the prompt; ``<image>`` tokens are removed), the
    final turns must be assistant turns. STIC stores one image path used for both sides, so the
    image becomes both ``chosen_media`` and ``rejected_media``. ``image_corruption`` and
    ``hallu_prompt`` are kept in ``meta`` (``stic_image_corruption``, ``stic_hallu_prompt``); note
    that the released generator records ``image_corruption: true`` without ever applying it.
    """

    def make(rec: dict[str, Any], lineno: int, sink: _MediaSink) -> PreferencePair:
        image = _require(rec, "image")
        chosen_msgs = _check_messages(_require(rec, "chosen"), "chosen")
        rejected_msgs = _check_messages(_require(rec, "rejected"), "rejected")
        if len(chosen_msgs) < 2 or chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise PairFormatError(
                "chosen and rejected must share the user turn(s) before the answer", field="rejected"
            )
        prompt, _ = flatten_messages(chosen_msgs[:-1], name="chosen")
        prompt, n_tokens = _strip_image_token(prompt)
        if prompt.strip() == "":
            raise PairFormatError("empty prompt (user turn)", field="chosen")
        media = [sink.store(image, "image")]
        meta: dict[str, Any] = {"source": "stic", "image": str(image)}
        if "image_corruption" in rec:
            meta["stic_image_corruption"] = bool(rec["image_corruption"])
        if rec.get("hallu_prompt"):
            meta["stic_hallu_prompt"] = _check_str(rec["hallu_prompt"], "hallu_prompt")
        if n_tokens:
            meta["image_tokens_removed"] = n_tokens
        return _same_media_pair(
            _record_id(rec, lineno, "stic"),
            prompt,
            _response_text(chosen_msgs[-1:], "chosen"),
            _response_text(rejected_msgs[-1:], "rejected"),
            media,
            meta,
        )

    return _convert(src, out, make, name="stic", image_root=image_root, skip_bad=skip_bad,
                    overwrite=overwrite, verify_images=verify_images, durable=durable)
