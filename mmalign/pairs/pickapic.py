"""Pick-a-Pic v2 rows (``caption, jpg_0, jpg_1, label_0``; DCPO's ``caption_0/1``) to and from pairs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmalign.pairs.convert import _convert, _Drop, _json_scalars, _MediaSink, _record_id, _require
from mmalign.pairs.errors import ConversionReport, PairFormatError
from mmalign.pairs.media import resolve_media
from mmalign.pairs.record import PreferencePair, _check_label, _check_str

__all__ = ["from_pickapic", "to_pickapic"]


def from_pickapic(
    src: Any,
    out: str | os.PathLike[str],
    *,
    keep_ties: bool = False,
    image_root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    verify_images: bool = True,
    durable: bool = True,
) -> ConversionReport:
    """Convert Pick-a-Pic v2 rows (``caption, jpg_0, jpg_1, label_0``) into a pair dataset.

    ``label_0`` is the preference for image 0: ``1`` -> image 0 chosen, ``0`` -> image 1 chosen,
    ``0.5`` -> a tie, dropped and counted unless ``keep_ties`` (then image 0 is ``chosen`` and
    ``label = 0.5``). Other values are bad rows. If ``label_1`` is present it must equal
    ``1 - label_0``; rows with ``has_label`` false are dropped as unlabeled. ``jpg_*`` may be
    bytes, ``{"bytes","path"}`` dicts, or paths relative to ``image_root``; images are fully
    decoded (``verify_images``) and stored verbatim as ``media/<sha256>.<ext>``.

    DCPO: when ``caption_0``/``caption_1`` are present (both required), ``chosen_caption`` is
    the chosen image's caption and ``rejected_caption`` the other, following the label.
    Scalar columns that are not consumed (``ranking_id``, ``model_0``, ...) go into ``meta``.
    """

    def make(rec: dict[str, Any], lineno: int, sink: _MediaSink) -> PreferencePair | _Drop:
        caption = _require(rec, "caption")
        _check_str(caption, "caption")
        if caption.strip() == "":
            raise PairFormatError("empty caption (the prompt)", field="caption")
        if "has_label" in rec and rec["has_label"] is not None and not rec["has_label"]:
            return _Drop("unlabeled")
        raw = _require(rec, "label_0")
        try:
            label_0 = _check_label(raw)
        except PairFormatError as exc:
            raise PairFormatError(exc.reason.replace("label", "label_0", 1), field="label_0") from None
        if rec.get("label_1") is not None:
            if isinstance(rec["label_1"], bool) or not isinstance(rec["label_1"], int | float):
                raise PairFormatError(f"label_1 {rec['label_1']!r} is not a number", field="label_1")
            if float(rec["label_1"]) != 1.0 - label_0:
                raise PairFormatError(
                    f"label_1 {rec['label_1']!r} != 1 - label_0 ({label_0})", field="label_1"
                )
        has0, has1 = rec.get("caption_0") is not None, rec.get("caption_1") is not None
        if has0 != has1:
            raise PairFormatError(
                "DCPO needs both caption_0 and caption_1", field="caption_1" if has0 else "caption_0"
            )
        captions = (
            (_check_str(rec["caption_0"], "caption_0"), _check_str(rec["caption_1"], "caption_1"))
            if has0
            else None
        )
        if label_0 == 0.5 and not keep_ties:
            _require(rec, "jpg_0")
            _require(rec, "jpg_1")
            return _Drop("tie")
        first = 1 if label_0 == 0.0 else 0  # the chosen image index
        second = 1 - first
        chosen_rel = sink.store(_require(rec, f"jpg_{first}"), f"jpg_{first}")
        rejected_rel = sink.store(_require(rec, f"jpg_{second}"), f"jpg_{second}")
        meta = {"source": "pickapic_v2", "label_0": label_0, "chosen_index": first}
        meta.update(_json_scalars(rec, ("caption", "jpg_0", "jpg_1", "label_0", "caption_0", "caption_1")))
        return PreferencePair(
            id=_record_id(rec, lineno, "pickapic", ("id", "ranking_id")),
            prompt=caption,
            chosen="",
            rejected="",
            chosen_media=[chosen_rel],
            rejected_media=[rejected_rel],
            chosen_caption=captions[first] if captions else None,
            rejected_caption=captions[second] if captions else None,
            label=0.5 if label_0 == 0.5 else 1.0,
            meta=meta,
        )

    return _convert(src, out, make, name="pickapic_v2", image_root=image_root, skip_bad=skip_bad,
                    overwrite=overwrite, verify_images=verify_images, durable=durable)


def to_pickapic(
    pairs: Iterable[PreferencePair], root: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Pick-a-Pic rows: ``caption`` (prompt), ``jpg_0`` = chosen bytes, ``jpg_1`` = rejected bytes,
    ``label_0`` = label, ``label_1`` = 1 - label, plus ``caption_0/1`` when the pair has captions.
    Each side must have exactly one media file."""
    rows = []
    for i, pair in enumerate(pairs, start=1):
        pair = pair.oriented()
        if len(pair.chosen_media) != 1 or len(pair.rejected_media) != 1:
            raise PairFormatError(
                f"pair {pair.id!r} needs exactly one image per side for Pick-a-Pic",
                source="<to_pickapic>",
                line=i,
                field="chosen_media",
                unit="item",
            )
        base = Path(root) if root is not None else pair.root
        if base is None:
            raise ValueError(f"pair {pair.id!r} has media but no root folder; pass root=")
        row: dict[str, Any] = {
            "caption": pair.prompt,
            "jpg_0": resolve_media(base, pair.chosen_media[0]).read_bytes(),
            "jpg_1": resolve_media(base, pair.rejected_media[0]).read_bytes(),
            "label_0": pair.label,
            "label_1": 1.0 - pair.label,
        }
        if pair.chosen_caption is not None or pair.rejected_caption is not None:
            row["caption_0"] = pair.chosen_caption if pair.chosen_caption is not None else pair.prompt
            row["caption_1"] = pair.rejected_caption if pair.rejected_caption is not None else pair.prompt
        rows.append(row)
    return rows
