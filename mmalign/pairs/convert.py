"""Shared machinery of the converters from public layouts (TRL, Pick-a-Pic, STIC, POVID).

A converter reads foreign records (a list of dicts, an HF dataset, or a ``.jsonl``/``.json``/
``.parquet`` file or HF folder), turns each into a :class:`~mmalign.pairs.PreferencePair` (or a
counted drop), stores images content-addressed as ``media/<sha256>.<ext>`` and writes the folder's
``pairs.jsonl`` atomically. A bad record raises naming source, record and field, or is skipped and
reported with ``skip_bad=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmalign.files import atomic_write_bytes, fsync_dir
from mmalign.pairs.errors import ConversionReport, MediaError, PairFormatError, SkippedRow
from mmalign.pairs.formats import _import_datasets
from mmalign.pairs.jsonl import PairWriter, _index_path, _jsonl_records
from mmalign.pairs.media import _media_bytes, load_image, resolve_media
from mmalign.pairs.record import PAIRS_JSONL, PreferencePair, _check_str, _reject_constant

__all__ = ["flatten_messages"]


_PIL_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}


def _iter_source_records(src: Any) -> tuple[str, str, Iterator[tuple[int, dict[str, Any] | PairFormatError]]]:
    """(source name, unit, records) from a path (.jsonl, .json, .parquet, HF folder) or an iterable."""
    if isinstance(src, str | os.PathLike):
        path = Path(src)
        if path.is_dir():
            datasets = _import_datasets()
            ds = datasets.load_from_disk(str(path))
            return str(path), "row", ((i, dict(r)) for i, r in enumerate(ds, start=1))
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return str(path), "line", _jsonl_records(path)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
            except (ValueError, UnicodeDecodeError) as exc:
                raise PairFormatError(f"invalid JSON: {exc}", source=str(path)) from exc
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise PairFormatError("expected a JSON list of records", source=str(path))

            def _records() -> Iterator[tuple[int, dict[str, Any] | PairFormatError]]:
                for i, rec in enumerate(data, start=1):
                    yield i, rec if isinstance(rec, dict) else PairFormatError("record is not a JSON object")

            return str(path), "record", _records()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return str(path), "row", ((i, r) for i, r in enumerate(table.to_pylist(), start=1))
        raise ValueError(
            f"unsupported source {str(path)!r}: give .jsonl, .json, .parquet or an HF dataset folder"
        )

    def _iterable() -> Iterator[tuple[int, dict[str, Any] | PairFormatError]]:
        for i, rec in enumerate(src, start=1):
            yield i, dict(rec) if isinstance(rec, dict) else PairFormatError("record is not a dict")

    return "<records>", "row", _iterable()


class _MediaSink:
    """Stores images from foreign rows into ``out/media/<sha256>.<ext>`` (content addressed)."""

    def __init__(self, out: Path, image_root: Path | None, verify: bool, durable: bool) -> None:
        self.out = out
        self.image_root = image_root
        self.verify = verify
        self.durable = durable

    def store(self, value: Any, name: str) -> str:
        if value is None:
            raise PairFormatError("missing image", field=name)
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path") is not None:
                value = value["path"]
            else:
                raise PairFormatError("image dict has neither 'bytes' nor 'path'", field=name)
        if isinstance(value, str | os.PathLike):
            if self.image_root is None:
                raise PairFormatError(f"image path {str(value)!r} given but no image_root", field=name)
            try:
                value = resolve_media(self.image_root, str(value))
            except PairFormatError as exc:
                reason = (
                    f"{exc.reason} (source image paths are relative to image_root {str(self.image_root)!r})"
                )
                raise PairFormatError(reason, field=name) from exc
        try:
            data = _media_bytes(value)
            if self.verify:
                load_image(data)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
        except MediaError as exc:
            raise PairFormatError(str(exc), field=name) from exc
        except Exception as exc:
            raise PairFormatError(f"not an image: {exc}", field=name) from exc
        digest = hashlib.sha256(data).hexdigest()[:32]
        rel = f"media/{digest}{_PIL_EXT.get(fmt, '.' + fmt.lower() if fmt else '.img')}"
        dest = self.out / rel
        if not (dest.exists() and dest.stat().st_size == len(data)):
            atomic_write_bytes(dest, data, durable=self.durable)
        return rel


class _Drop:
    def __init__(self, why: Literal["tie", "unlabeled"]) -> None:
        self.why = why


def _convert(
    src: Any,
    out: str | os.PathLike[str],
    make: Callable[[dict[str, Any], int, _MediaSink], PreferencePair | _Drop],
    *,
    name: str,
    image_root: str | os.PathLike[str] | None,
    skip_bad: bool,
    overwrite: bool,
    verify_images: bool,
    durable: bool,
) -> ConversionReport:
    out = Path(out)
    dest = out / PAIRS_JSONL
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True")
    source, unit, records = _iter_source_records(src)
    report = ConversionReport(source=f"{name} from {source}", out_folder=out)
    sink = _MediaSink(out, Path(image_root) if image_root is not None else None, verify_images, durable)
    partial = f".{PAIRS_JSONL}.converting"
    (out / partial).unlink(missing_ok=True)
    try:
        with PairWriter(out, filename=partial, durable=False) as writer:
            for lineno, rec in records:
                try:
                    if isinstance(rec, PairFormatError):
                        raise rec
                    made = make(rec, lineno, sink)
                    if isinstance(made, _Drop):
                        if made.why == "tie":
                            report.ties_dropped += 1
                        else:
                            report.unlabeled_dropped += 1
                        continue
                    writer.write(made)
                except PairFormatError as exc:
                    err = exc.at(source, lineno, unit)
                    if not skip_bad:
                        raise err from None
                    report.skipped.append(SkippedRow(lineno, err.field, err.reason, source, unit))
                    continue
                report.kept += 1
        if durable:
            with open(out / partial, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(out / partial, dest)
        if durable:
            fsync_dir(out)
    finally:
        (out / partial).unlink(missing_ok=True)
        _index_path(out / partial).unlink(missing_ok=True)
    return report


def _require(rec: dict[str, Any], key: str) -> Any:
    if key not in rec or rec[key] is None:
        raise PairFormatError("missing required field", field=key)
    return rec[key]


def _json_scalars(rec: dict[str, Any], skip: Iterable[str]) -> dict[str, Any]:
    skip = set(skip)
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if key in skip or not isinstance(key, str):
            continue
        if isinstance(value, bool | int | str):
            out[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = value
    return out


def _record_id(rec: dict[str, Any], lineno: int, prefix: str, keys: Sequence[str] = ("id",)) -> str:
    for key in keys:
        value = rec.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return f"{prefix}-{lineno}"


def _content_text(content: Any, name: str) -> tuple[str, int]:
    """Text of a message ``content`` (string or list of typed parts) and its image-part count.

    Rule: text parts are joined with ``"\\n"``; ``{"type": "image"}`` parts are counted and dropped
    (the images travel as media).
    """
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise PairFormatError(
            f"message content must be a string or a list of parts, got {type(content).__name__}", field=name
        )
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise PairFormatError("content part must be a dict with a 'type'", field=name)
        if part["type"] == "text":
            texts.append(_check_str(part.get("text"), name))
        elif part["type"] in ("image", "image_url"):
            images += 1
        else:
            raise PairFormatError(f"unsupported content part type {part['type']!r}", field=name)
    return "\n".join(texts), images


def _check_messages(messages: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise PairFormatError("must be a non-empty list of messages", field=name)
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise PairFormatError("each message needs 'role' (string) and 'content'", field=name)
    return messages


def flatten_messages(messages: list[dict[str, Any]], *, name: str = "prompt") -> tuple[str, int]:
    """Flatten chat messages to one string; returns (text, number of image parts).

    Rule: a single message becomes its text; several messages become ``"{role}: {text}"`` lines
    joined with ``"\\n"`` (readers keep the original list in ``meta`` so a chat template can be
    applied faithfully). Image parts are dropped and counted.
    """
    _check_messages(messages, name)
    texts = []
    images = 0
    for i, msg in enumerate(messages):
        text, n = _content_text(msg["content"], f"{name}[{i}].content")
        texts.append(text)
        images += n
    if len(messages) == 1:
        return texts[0], images
    return "\n".join(f"{m['role']}: {t}" for m, t in zip(messages, texts, strict=True)), images


def _response_text(messages: Any, name: str) -> str:
    """Response messages must all be assistant turns; their texts are joined with ``"\\n"``."""
    if isinstance(messages, str):
        return messages
    _check_messages(messages, name)
    texts = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            raise PairFormatError(
                f"response message {i} has role {msg['role']!r}, expected 'assistant'", field=name
            )
        texts.append(_content_text(msg["content"], f"{name}[{i}].content")[0])
    return "\n".join(texts)


def _same_media_pair(
    pair_id: str, prompt: str, chosen: str, rejected: str, media: list[str], meta: dict[str, Any]
) -> PreferencePair:
    """A pair whose two responses answer the same images (TRL, STIC and POVID records share one list)."""
    return PreferencePair(
        id=pair_id,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_media=media,
        rejected_media=list(media),
        meta=meta,
    )


def _strip_image_token(text: str) -> tuple[str, int]:
    n = text.count("<image>")
    return (text.replace("<image>", "").strip() if n else text), n
