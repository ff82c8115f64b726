"""Image question-answer records: the input of POVID and SCL pair generation.

A records file is one of:

* **JSONL** (any suffix but ``.json``): one object per line,
  ``{"id": "r1", "image": "images/1.jpg", "question": "What is on the table?", "answer": "A red cube."}``;
* **LLaVA instruction JSON** (``.json``): a list of
  ``{"id": ..., "image": ..., "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
  "value": "A"}, ...]}``; the first human turn is the question (``<image>`` tokens removed) and the gpt
  turn after it the answer; later turns are ignored. A JSONL line may use this layout too.

``id`` (a non-empty string or an integer) must be unique: pair ids derive from it, which is what makes
a run resumable. ``image`` is a path relative to the records file's folder, or to ``image_root`` when
given (LLaVA's ``coco/train2017/...`` paths are relative to its image folder). ``answer`` is the
ground truth: POVID's chosen answer, SCL's gold answer (e.g. ``"B"``).

A bad record (invalid JSON, a missing or empty field, a text-only LLaVA record, a duplicate id, an
image path leaving the root) is reported as a :class:`mmalign.pairs.PairFormatError` naming the file,
the line and the field; :func:`read_image_qa` returns these next to the good records so a large run
can skip and count them instead of stopping.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.pairs import PairFormatError

__all__ = ["ImageQA", "load_records", "open_record_image", "read_image_qa", "run_pairs_job", "store_record_image"]


@dataclass(frozen=True)
class ImageQA:
    """One record: ``image`` is a file path or a PIL image; ``source`` says where it was read (for messages)."""

    id: str
    image: Any
    question: str
    answer: str
    source: str = ""


def _json_list_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(line where each element starts, element) of a JSON list, parsed element by element."""
    decoder = json.JSONDecoder()
    idx, line, counted = 0, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    idx = skip(idx)
    if not text.startswith("[", idx):
        raise PairFormatError("expected a JSON list of records ([{...}, ...])", source=source, line=1)
    idx = skip(idx + 1)
    if text.startswith("]", idx):
        return
    while True:
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            obj, idx = decoder.raw_decode(text, idx)
        except ValueError as exc:
            raise PairFormatError(f"invalid JSON: {exc}", source=source, line=line) from exc
        yield line, obj
        idx = skip(idx)
        if text.startswith("]", idx):
            return
        if not text.startswith(",", idx):
            line += text.count("\n", counted, idx)
            raise PairFormatError("expected ',' or ']' after a record", source=source, line=line)
        idx = skip(idx + 1)


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed object or PairFormatError) per record of a JSON list or a JSONL file."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PairFormatError(f"cannot read the records file: {exc}", source=source) from exc
    if path.suffix.lower() == ".json":
        yield from _json_list_rows(text, source)
        return
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw)
        except ValueError as exc:
            yield lineno, PairFormatError(f"invalid JSON: {exc}", source=source, line=lineno)


def _text(row: dict[str, Any], key: str, name: str | None = None) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else ("empty" if isinstance(value, str) else f"not a string ({type(value).__name__})")
        raise PairFormatError(f"{what}; expected a non-empty string", field=name or key)
    return value


def _llava_qa(row: dict[str, Any]) -> tuple[str, str]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise PairFormatError("expected a list of turns", field="conversations")
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") == "human":
            question = _text(turn, "value", f"conversations[{i}].value").replace("<image>", "").strip()
            if not question:
                raise PairFormatError("the human turn holds only <image>", field=f"conversations[{i}].value")
            nxt = turns[i + 1] if i + 1 < len(turns) else None
            if not (isinstance(nxt, dict) and nxt.get("from") == "gpt"):
                raise PairFormatError("no gpt turn after the first human turn", field=f"conversations[{i + 1}]")
            return question, _text(nxt, "value", f"conversations[{i + 1}].value").strip()
    raise PairFormatError("no human turn", field="conversations")


def _record(row: Any, root: Path) -> ImageQA:
    from mmalign.pairs import resolve_media

    if not isinstance(row, dict):
        raise PairFormatError(f"expected a JSON object, got {type(row).__name__}")
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or not str(rid).strip():
        raise PairFormatError("missing or empty; expected a non-empty string or an integer", field="id")
    if "conversations" in row and "question" not in row:
        question, answer = _llava_qa(row)
    else:
        question, answer = _text(row, "question").strip(), _text(row, "answer").strip()
    if row.get("image") is None:
        raise PairFormatError("missing (a text-only record?)", field="image")
    try:  # symlinks may point anywhere (an image root often links to a shared data disk); ".." may not
        image = resolve_media(root, row["image"], follow_symlinks=True)
    except PairFormatError as exc:
        raise PairFormatError(exc.reason, field="image") from exc
    return ImageQA(str(rid), str(image), question, answer)


def read_image_qa(
    path: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None
) -> tuple[list[ImageQA], list[PairFormatError]]:
    """Read a records file (see the module docstring): ``(records in file order, errors of the bad ones)``.

    Each error names the file, the line and the field; a duplicate id is an error on its second line
    (naming the first). Raises :class:`PairFormatError` when the file itself cannot be read or, for a
    ``.json`` list, parsed past a point.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist")
    root = Path(image_root) if image_root else path.parent
    records: list[ImageQA] = []
    errors: list[PairFormatError] = []
    first_line: dict[str, int] = {}
    for line, row in _rows(path):
        try:
            if isinstance(row, PairFormatError):
                raise row
            rec = _record(row, root)
            if rec.id in first_line:
                raise PairFormatError(f"duplicate id {rec.id!r} (first on line {first_line[rec.id]})", field="id")
        except PairFormatError as exc:
            errors.append(exc.at(str(path), line))
            continue
        first_line[rec.id] = line
        records.append(ImageQA(rec.id, rec.image, rec.question, rec.answer, source=f"{path}, line {line}"))
    return records, errors


def load_records(config: Any, records: Sequence[ImageQA] | None, report: Any, *, count_bad: bool = True) -> list[ImageQA]:
    """The records to work on (given, or read from ``config.records``); bad rows raise (``config.skip_bad``
    false) or are skipped, and counted in ``report`` when ``count_bad`` (one process of a sharded run
    counts them: every process reads the whole file). ``config.limit`` keeps the first good records."""
    if records is None:
        if not config.records:
            raise ValueError(f"{type(config).__name__}.records is required (a records file)")
        records, errors = read_image_qa(config.records, image_root=config.image_root or None)
        if errors and not config.skip_bad:
            raise errors[0]
        for exc in errors if count_bad else ():
            report.skip("bad record", str(exc))
    records = list(records)
    return records[: config.limit] if config.limit is not None else records


def open_record_image(rec: ImageQA, report: Any) -> Any:
    """The record's RGB image, or None (skipped and counted: fix the file and re-run to retry it)."""
    from PIL import Image

    from mmalign.pairs import load_image

    if isinstance(rec.image, Image.Image):
        return rec.image.convert("RGB")
    try:
        return load_image(rec.image)
    except ValueError as exc:
        report.skip("unreadable image", f"{rec.source or rec.id}: {exc}")
        return None


def store_record_image(writer: Any, rec: ImageQA, image: Any) -> str:
    """Store the record's clean image in ``writer``'s folder; return its relative path.

    A file is copied as is (the loader gives training the same pixels), named after its path, so
    records that share an image (several questions about one picture) share one copy; an in-memory
    image is saved as a lossless PNG named after the record id.
    """
    from mmalign.sharding import media_stem

    if isinstance(rec.image, str | Path):
        suffix = Path(rec.image).suffix.lower() or ".img"
        return writer.add_media(rec.image, f"media/{media_stem(str(rec.image))}{suffix}", overwrite=True, verify=False)
    return writer.add_media(image, f"media/{media_stem(rec.id)}.png", overwrite=True)


def run_pairs_job(job: Any, section: str, build: Callable[[Any, Any, Any], Any]) -> int:
    """Run a pair-generation job read from the command line: ``job`` has ``model``, ``trust_remote_code``,
    ``dtype`` and the builder's config under ``section`` (with ``records`` and ``out_dir``).

    The inputs are checked before any model is loaded (a message on stderr and 2 when one is missing);
    then the policy is loaded (:func:`vision.train.load_vlm`) onto this process's device
    (:func:`mmalign.distributed.process_state`), ``build(policy, processor, device)`` runs, and its report's
    summary is printed. Returns 0.
    """
    from mmalign.distributed import process_state
    from vision.train import load_vlm

    config = getattr(job, section)
    problem = None
    if not job.model:
        problem = "--model is required (a folder, hub name or tiny:<family>)"
    elif not config.records or not config.out_dir:
        problem = f"--{section}.records and --{section}.out_dir are required"
    elif not Path(config.records).is_file():
        problem = f"records file {config.records!r} does not exist"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    device = process_state().device
    policy, processor = load_vlm(job.model, trust_remote_code=job.trust_remote_code, dtype=job.dtype)
    report = build(policy.to(device), processor, device)
    print(report.summary())
    return 0
