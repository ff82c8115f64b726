"""Video pair datasets: our pair folders with video media, and LLaVA-Hound-DPO records.

Our format is :mod:`mmalign.pairs`' folder (``pairs.jsonl`` + media): a side's media is one video, either a
video file (``["media/clip.mp4"]``) or the frame images of one video in order
(``["media/clip/0001.jpg", ...]``); :class:`video.adapter.VideoLLMAdapter` reads both.

LLaVA-Hound-DPO (RifleZhang/LLaVA-Hound-DPO; 17k pairs whose answers were scored by a text model from
detailed captions) ships records ``{"id", "prompt", "chosen", "rejected", "video", ...}`` (scores such as
``chosen_score``/``rejected_score`` and the reference ``answer`` are kept in ``meta``), as a JSON list or
JSONL. ``video`` names a video file or a folder of extracted frames under ``video_root``, with or without
its extension. :func:`read_llava_hound` loads them as pairs in place (media relative to ``video_root``);
:func:`from_llava_hound` converts them into a self-contained pair folder (media copied in).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmalign.pairs import PairDataset, PairFormatError, PairWriter, PreferencePair, SkippedRow
from video.frames import VIDEO_EXTENSIONS

__all__ = [
    "FRAME_EXTENSIONS",
    "from_llava_hound",
    "json_records",
    "load_video_pairs",
    "read_llava_hound",
    "resolve_video",
]

FRAME_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def json_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """``(record number, record)`` from a JSON list (``.json``) or a JSONL file (one object per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        rows = json.loads(text)
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise PairFormatError("expected a JSON list of records", source=str(path))
        yield from enumerate(rows, start=1)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except ValueError as exc:
                raise PairFormatError(f"invalid JSON: {exc}", source=str(path), line=lineno) from exc


def resolve_video(video_root: str | os.PathLike[str], name: str) -> list[str]:
    """The media list (relative to ``video_root``) of video ``name``: a file, ``name`` + a video extension,
    or the sorted frame images of folder ``name``.

    Raises:
        PairFormatError: nothing of that name, or a folder without frame images.
    """
    from mmalign.pairs import check_rel_path

    root = Path(video_root)
    rel = check_rel_path(name, "video")
    path = root / rel
    if path.is_file():
        return [rel]
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
        if not frames:
            raise PairFormatError(f"video folder {rel!r} holds no frame images {FRAME_EXTENSIONS}", field="video")
        return [p.relative_to(root).as_posix() for p in frames]
    for ext in VIDEO_EXTENSIONS:
        if (root / (rel + ext)).is_file():
            return [rel + ext]
    raise PairFormatError(f"no video file or frame folder {rel!r} under {str(root)!r}", field="video")


def _hound_pair(rec: Any, lineno: int, video_root: Path, seen: set[str]) -> PreferencePair:
    if not isinstance(rec, dict):
        raise PairFormatError("record is not a JSON object")
    for key in ("prompt", "chosen", "rejected", "video"):
        if not isinstance(rec.get(key), str):
            raise PairFormatError("missing or not a string", field=key)
    prompt = rec["prompt"]
    removed = prompt.count("<video>")
    prompt = prompt.replace("<video>\n", "").replace("<video>", "").strip()
    media = resolve_video(video_root, rec["video"])
    rid = str(rec.get("id", f"llava_hound/{lineno}"))
    if rid in seen:  # LLaVA-Hound ids name videos; several questions may share one
        rid = f"{rid}#{lineno}"
    seen.add(rid)
    meta: dict[str, Any] = {"source": "llava_hound", "video": rec["video"]}
    for key, value in rec.items():
        if key not in ("id", "prompt", "chosen", "rejected", "video") and isinstance(value, str | int | float | bool):
            meta[key] = value
    if removed:
        meta["video_tokens_removed"] = removed
    return PreferencePair(rid, prompt, rec["chosen"], rec["rejected"], media, media, meta=meta)


def read_llava_hound(
    src: str | os.PathLike[str], *, video_root: str | os.PathLike[str], skip_bad: bool = False
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    """LLaVA-Hound-DPO records as pairs whose media are relative to ``video_root`` (set as their root).

    Returns ``(pairs, skipped)``; a bad record raises :class:`~mmalign.pairs.PairFormatError` naming its
    line and field, or is listed in ``skipped`` with ``skip_bad=True``.
    """
    root = Path(video_root)
    pairs: list[PreferencePair] = []
    skipped: list[SkippedRow] = []
    seen: set[str] = set()
    for lineno, rec in json_records(src):
        try:
            pairs.append(_hound_pair(rec, lineno, root, seen).with_root(root))
        except PairFormatError as exc:
            err = exc.at(str(src), lineno, "record")
            if not skip_bad:
                raise err from None
            skipped.append(SkippedRow(lineno, err.field, err.reason, str(src), "record"))
    return pairs, skipped


def from_llava_hound(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    video_root: str | os.PathLike[str],
    skip_bad: bool = False,
    overwrite: bool = False,
) -> tuple[int, list[SkippedRow]]:
    """Convert LLaVA-Hound-DPO records into our pair folder ``out``; returns ``(pairs written, skipped)``.

    Each video (file or frame folder) is copied once to ``out/media/<hash of its name>/...``. The pairs file
    is written under a temporary name and renamed into place, so ``out/pairs.jsonl`` is never half-written.
    """
    out = Path(out)
    dest = out / "pairs.jsonl"
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True")
    pairs, skipped = read_llava_hound(src, video_root=video_root, skip_bad=skip_bad)
    partial = ".pairs.jsonl.converting"
    (out / partial).unlink(missing_ok=True)
    copied: dict[str, str] = {}
    try:
        with PairWriter(out, filename=partial, durable=False) as writer:
            for pair in pairs:
                media = []
                for rel in pair.chosen_media:
                    if rel not in copied:
                        video = pair.meta["video"]
                        folder = hashlib.sha1(video.encode()).hexdigest()[:16]
                        copied[rel] = writer.add_media(
                            Path(video_root) / rel, f"media/{folder}/{Path(rel).name}", overwrite=True, verify=False
                        )
                    media.append(copied[rel])
                data = pair.to_dict()
                data["chosen_media"] = data["rejected_media"] = media
                writer.write(PreferencePair.from_dict(data))
            writer.sync()
        os.replace(out / partial, dest)
    finally:
        (out / partial).unlink(missing_ok=True)
    return len(pairs), skipped


def load_video_pairs(
    data: str | os.PathLike[str],
    *,
    data_format: str = "pairs",
    video_root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
) -> PairDataset:
    """A :class:`~mmalign.pairs.PairDataset` from our pair folder (``"pairs"``) or LLaVA-Hound records
    (``"llava_hound"``: a ``.json``/``.jsonl`` file whose videos live under ``video_root``).

    A bad record (or a missing media file) raises naming its file, line and field, or with ``skip_bad`` is
    left out and listed in the dataset's ``skipped``; :func:`video.frames.check_videos` then decodes the videos.
    """
    if data_format == "pairs":
        return PairDataset(data, skip_bad=skip_bad)
    if data_format == "llava_hound":
        if video_root is None:
            raise ValueError("load_video_pairs: data_format='llava_hound' needs video_root")
        pairs, skipped = read_llava_hound(data, video_root=video_root, skip_bad=skip_bad)
        dataset = PairDataset(pairs, root=video_root)
        dataset.skipped.extend(skipped)
        return dataset
    raise ValueError(f"load_video_pairs: data_format must be 'pairs' or 'llava_hound', got {data_format!r}")
