"""The :class:`PreferencePair` record: its fields and checks, its JSON line, and validated reading.

Labels. ``label`` is the probability that ``chosen`` is preferred: ``1.0`` for an ordinary pair,
``0.5`` for a tie (kept only on request), ``0.0`` for a pair stored the wrong way round. Readers
*orient* pairs by default (a ``0.0`` pair is returned with sides swapped, ``label=1.0`` and
``meta["swapped_from_label_0"] = True``), so training code never sees reversed pairs silently.

Text must be Unicode: a lone surrogate (JSON ``"\\ud800"``) is refused on read and on write,
naming file, line and field. ``chosen``/``rejected``/``prompt`` may not be whitespace only, and
``chosen`` may not equal ``rejected`` up to whitespace (with the same media and captions).

Every reader (JSONL, Parquet, HF ``datasets``) turns its records into pairs with one function here,
so ids, media checks and orientation follow the same rules whatever the file format.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from mmalign.pairs.errors import PairFormatError, SkippedRow, _surrogate_problem
from mmalign.pairs.media import _decode_problem, check_rel_path, load_image, resolve_media

__all__ = ["PAIRS_JSONL", "PAIRS_PARQUET", "PAIRS_HF", "VALID_LABELS", "CheckMedia", "PreferencePair"]


PAIRS_JSONL = "pairs.jsonl"
PAIRS_PARQUET = "pairs.parquet"
PAIRS_HF = "pairs_hf"
VALID_LABELS: tuple[float, ...] = (0.0, 0.5, 1.0)
_REQUIRED = ("id", "prompt", "chosen", "rejected")
_OPTIONAL = ("chosen_media", "rejected_media", "chosen_caption", "rejected_caption", "label", "meta")
_FIELDS = _REQUIRED + _OPTIONAL
CheckMedia = Literal["none", "exists", "decode"]


def _check_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise PairFormatError(f"must be a string, got {type(value).__name__}", field=name)
    problem = _surrogate_problem(value)
    if problem is not None:
        raise PairFormatError(problem, field=name)
    return value


def _check_meta_text(value: Any, where: str = "meta") -> None:
    """Every key and string in ``meta`` must be encodable; the error names the path (``meta['k'][1]``)."""
    if isinstance(value, str):
        problem = _surrogate_problem(value)
        if problem is not None:
            raise PairFormatError(f"{where} {problem}", field="meta")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _surrogate_problem(key) is not None:
                raise PairFormatError(f"a key of {where} {_surrogate_problem(key)}", field="meta")
            _check_meta_text(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_meta_text(item, f"{where}[{i}]")


def _check_text_fields(pair: PreferencePair) -> None:
    """Re-check that every string of a (possibly mutated) pair is encodable, naming the field."""
    for name in ("id", "prompt", "chosen", "rejected", "chosen_caption", "rejected_caption"):
        value = getattr(pair, name)
        if value is not None:
            _check_str(value, name)
    for name, rel in _media_fields(pair):
        _check_str(rel, name)
    _check_meta_text(pair.meta)


def _check_media_list(value: Any, name: str) -> list[str]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise PairFormatError(f"must be a list of relative paths, got {type(value).__name__}", field=name)
    return [check_rel_path(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _check_label(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PairFormatError(f"must be a number in {{0, 0.5, 1}}, got {value!r}", field="label")
    label = float(value)
    if math.isnan(label) or label not in VALID_LABELS:
        raise PairFormatError(f"label {value!r} is not one of 0, 0.5, 1", field="label")
    return label


def _words(text: str | None) -> list[str] | None:
    return None if text is None else text.split()


@dataclass
class PreferencePair:
    """One preference judgement: ``chosen`` is preferred to ``rejected`` given ``prompt``.

    ``chosen_media``/``rejected_media`` are POSIX paths relative to the dataset folder (images or
    video frames); chosen and rejected may have *different* media. For diffusion pairs the texts
    may be ``""`` and the images are the media; ``chosen_caption``/``rejected_caption`` are
    per-side captions (DCPO). ``label`` is P(chosen preferred): 1.0, 0.5 (tie) or 0.0 (reversed;
    see :meth:`oriented`). ``meta`` is any JSON-serialisable dict.

    Validation (``__post_init__``) raises :class:`PairFormatError` naming the field: among the
    rules, ``prompt`` is not blank, ``chosen``/``rejected`` are ``""`` (a side that is only media)
    or hold non-whitespace text, the two sides differ by more than whitespace (or in media or
    caption), and every string (``meta`` included) is valid Unicode (no lone surrogate). A pair
    returned by a reader also knows its dataset folder (:attr:`root`, not a field: not
    serialised or compared) so media can be resolved with :meth:`media_paths`.
    """

    id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_media: list[str] = field(default_factory=list)
    rejected_media: list[str] = field(default_factory=list)
    chosen_caption: str | None = None
    rejected_caption: str | None = None
    label: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self.id, "id")
        if self.id.strip() == "":
            raise PairFormatError("empty id", field="id")
        _check_str(self.prompt, "prompt")
        if self.prompt.strip() == "":
            blank = f" (whitespace only: {self.prompt!r})" if self.prompt else ""
            raise PairFormatError(f"empty prompt{blank}", field="prompt")
        for name in ("chosen", "rejected"):
            text = _check_str(getattr(self, name), name)
            if text and not text.strip():
                raise PairFormatError(
                    f"{name} is whitespace only ({text!r}); a side with media and no text uses \"\"",
                    field=name,
                )
        self.chosen_media = _check_media_list(self.chosen_media, "chosen_media")
        self.rejected_media = _check_media_list(self.rejected_media, "rejected_media")
        for name in ("chosen_caption", "rejected_caption"):
            value = getattr(self, name)
            if value is not None:
                _check_str(value, name)
        self.label = _check_label(self.label)
        if not isinstance(self.meta, dict):
            raise PairFormatError(f"must be a dict, got {type(self.meta).__name__}", field="meta")
        _check_meta_text(self.meta)
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PairFormatError(f"meta is not JSON-serialisable: {exc}", field="meta") from exc
        if self.chosen == "" and not self.chosen_media:
            raise PairFormatError("chosen side is empty (no text and no media)", field="chosen")
        if self.rejected == "" and not self.rejected_media:
            raise PairFormatError("rejected side is empty (no text and no media)", field="rejected")
        if self.chosen_media == self.rejected_media and _words(self.chosen) == _words(self.rejected) and (
            _words(self.chosen_caption) == _words(self.rejected_caption)
        ):
            exact = self.chosen == self.rejected and self.chosen_caption == self.rejected_caption
            raise PairFormatError(
                "chosen and rejected are identical (same text, media and caption)"
                if exact
                else "chosen and rejected differ only in whitespace (same words, media and caption)",
                field="rejected",
            )
        self._root: Path | None = None
        self._origin: tuple[str, int, str] | None = None

    # -- dataset folder ------------------------------------------------------------------------
    @property
    def root(self) -> Path | None:
        """The dataset folder media paths are relative to (set by readers), else ``None``."""
        return self._root

    def with_root(self, root: str | os.PathLike[str] | None) -> PreferencePair:
        """Set :attr:`root` in place and return ``self``."""
        self._root = None if root is None else Path(root)
        return self

    @property
    def origin(self) -> tuple[str, int, str] | None:
        """Where a reader found this pair: (file, 1-based line or row, ``"line"``/``"row"``), else ``None``."""
        return self._origin

    def media_paths(self, *, follow_symlinks: bool = False) -> tuple[list[Path], list[Path]]:
        """Absolute paths of (chosen_media, rejected_media); needs :attr:`root`."""
        if self._root is None:
            raise ValueError(f"pair {self.id!r} has no dataset folder (root); use with_root(folder)")
        return (
            [resolve_media(self._root, r, follow_symlinks=follow_symlinks) for r in self.chosen_media],
            [resolve_media(self._root, r, follow_symlinks=follow_symlinks) for r in self.rejected_media],
        )

    def load_images(self) -> tuple[list[Image.Image], list[Image.Image]]:
        """Chosen and rejected media loaded with :func:`load_image` (RGB)."""
        chosen, rejected = self.media_paths()
        return [load_image(p) for p in chosen], [load_image(p) for p in rejected]

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with every field (lists and meta copied)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_media": list(self.chosen_media),
            "rejected_media": list(self.rejected_media),
            "chosen_caption": self.chosen_caption,
            "rejected_caption": self.rejected_caption,
            "label": self.label,
            "meta": json.loads(json.dumps(self.meta)),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PreferencePair:
        """Build and validate a pair; unknown keys and missing required fields raise."""
        if not isinstance(data, dict):
            raise PairFormatError(f"a pair must be a JSON object, got {type(data).__name__}")
        for name in _REQUIRED:
            if name not in data or data[name] is None:
                raise PairFormatError("missing required field", field=name)
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise PairFormatError(
                f"unknown field(s) {unknown}; a pair has {list(_FIELDS)}", field=str(unknown[0])
            )
        for name in ("chosen_media", "rejected_media", "label", "meta"):
            if name in data and data[name] is None:
                raise PairFormatError("must not be null (leave the field out for its default)", field=name)
        return cls(**{k: data[k] for k in _FIELDS if k in data})

    def oriented(self) -> PreferencePair:
        """A ``label == 0`` pair with sides swapped and ``label = 1``; other pairs unchanged."""
        if self.label != 0.0:
            return self
        meta = dict(self.meta)
        meta["swapped_from_label_0"] = True
        out = PreferencePair(
            id=self.id,
            prompt=self.prompt,
            chosen=self.rejected,
            rejected=self.chosen,
            chosen_media=list(self.rejected_media),
            rejected_media=list(self.chosen_media),
            chosen_caption=self.rejected_caption,
            rejected_caption=self.chosen_caption,
            label=1.0,
            meta=meta,
        )
        out._origin = self._origin
        return out.with_root(self._root)


def _media_fields(pair: PreferencePair) -> Iterator[tuple[str, str]]:
    """(field name such as ``"chosen_media[0]"``, relative path) for each media item of a pair."""
    for side in ("chosen_media", "rejected_media"):
        for i, rel in enumerate(getattr(pair, side)):
            yield f"{side}[{i}]", rel


def _check_pair_media(pair: PreferencePair, root: Path | None, check_media: CheckMedia) -> None:
    """Media of ``pair`` inside ``root`` and present (and decodable with ``"decode"``); the error
    names the pair id and the field (callers add file and line)."""
    if check_media == "none" or root is None:
        return
    for name, rel in _media_fields(pair):
        try:
            path = resolve_media(root, rel)
            exists = path.is_file()
        except PairFormatError as exc:
            raise PairFormatError(f"pair {pair.id!r}: {exc.reason}", field=name) from exc
        except OSError as exc:  # e.g. permission denied on a parent folder
            raise PairFormatError(f"pair {pair.id!r}: cannot access media file {rel!r}: {exc}", field=name) from exc
        if not exists:
            raise PairFormatError(f"pair {pair.id!r}: media file {rel!r} not found in {str(root)!r}", field=name)
        if check_media == "decode":
            problem = _decode_problem(path)
            if problem is not None:
                raise PairFormatError(f"pair {pair.id!r}: {problem}", field=name)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not valid JSON")


def _no_duplicate_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json_object(text: str) -> dict[str, Any]:
    obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _pair_line(pair: PreferencePair, source: str, line: int) -> bytes:
    """The JSONL line of ``pair``; an unencodable string (a lone surrogate set after validation)
    raises :class:`PairFormatError` naming ``source``, ``line`` and the field."""
    try:
        return (json.dumps(pair.to_dict(), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        try:
            _check_text_fields(pair)
        except PairFormatError as exc:
            raise exc.at(source, line) from None
        raise


def _collect_pairs(
    records: Iterable[tuple[int, dict[str, Any] | PairFormatError]],
    *,
    source: str,
    unit: str,
    root: Path | None,
    skip_bad: bool,
    check_media: CheckMedia,
    orient: bool,
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    if check_media not in ("none", "exists", "decode"):
        raise ValueError(f"check_media must be 'none', 'exists' or 'decode', got {check_media!r}")
    pairs: list[PreferencePair] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    for lineno, rec in records:
        try:
            if isinstance(rec, PairFormatError):
                raise rec
            pair = PreferencePair.from_dict(rec)
            if pair.id in seen:
                raise PairFormatError(
                    f"duplicate id {pair.id!r} (first on {unit} {seen[pair.id]})", field="id"
                )
            _check_pair_media(pair, root, check_media)
        except PairFormatError as exc:
            err = exc.at(source, lineno, unit)
            if not skip_bad:
                raise err from None
            skipped.append(SkippedRow(lineno, err.field, err.reason, source, unit))
            continue
        seen[pair.id] = lineno
        pair.with_root(root)
        pair._origin = (source, lineno, unit)
        pairs.append(pair.oriented() if orient else pair)
    return pairs, skipped


def _check_unique_ids(pairs: Sequence[PreferencePair], source: str) -> None:
    seen: dict[str, int] = {}
    for i, pair in enumerate(pairs, start=1):
        if pair.id in seen:
            raise PairFormatError(
                f"duplicate id {pair.id!r} (also item {seen[pair.id]})",
                source=source,
                line=i,
                field="id",
                unit="item",
            )
        seen[pair.id] = i


def _check_before_write(
    pairs: Sequence[PreferencePair], folder: Path, dest: Path, *, check_media: bool, unit: str = "item"
) -> None:
    """Unique ids, encodable text (no lone surrogate set after validation) and (with
    ``check_media``) media present in ``folder``; errors name ``dest``, the item (or line) and field."""
    _check_unique_ids(pairs, str(dest))
    for i, pair in enumerate(pairs, start=1):
        try:
            _check_text_fields(pair)
            if check_media:
                _check_pair_media(pair, folder, "exists")
        except PairFormatError as exc:
            raise exc.at(str(dest), i, unit) from None
