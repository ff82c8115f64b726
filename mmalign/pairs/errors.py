"""Errors and reports of the pair readers, writers and converters.

:class:`PairFormatError` names the file, the 1-based line (or row, item, record) and the field of
bad input; :class:`MediaError` an image that cannot be used; :class:`SkippedRow` a row left out with
``skip_bad=True``; :class:`ConversionReport` what a converter kept and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PairFormatError", "MediaError", "SkippedRow", "ConversionReport"]


class PairFormatError(ValueError):
    """Bad input: names the file (``source``), the 1-based line or row, and the field."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        self.field = field
        self.unit = unit
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.source is not None:
            where.append(str(self.source))
        if self.line is not None:
            where.append(f"{self.unit} {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.reason

    def at(self, source: str | None, line: int | None, unit: str = "line") -> PairFormatError:
        """The same error with file and line filled in (keeps a field already set)."""
        return PairFormatError(self.reason, source=source, line=line, field=self.field, unit=unit)


class MediaError(ValueError):
    """An image that cannot be opened, verified or fully decoded."""


@dataclass(frozen=True)
class SkippedRow:
    """A row left out by a reader or converter with ``skip_bad=True`` (line/row is 1-based)."""

    line: int | None
    field: str | None
    reason: str
    source: str = ""
    unit: str = "line"

    def __str__(self) -> str:
        return str(
            PairFormatError(
                self.reason, source=self.source or None, line=self.line, field=self.field, unit=self.unit
            )
        )


@dataclass
class ConversionReport:
    """What a converter did: ``kept`` pairs written, rows dropped by rule, bad rows skipped."""

    source: str
    out_folder: Path | None = None
    kept: int = 0
    ties_dropped: int = 0
    unlabeled_dropped: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return len(self.skipped)

    @property
    def rows(self) -> int:
        return self.kept + self.ties_dropped + self.unlabeled_dropped + self.bad

    def __str__(self) -> str:
        return (
            f"{self.source}: {self.rows} rows -> kept {self.kept}, ties dropped {self.ties_dropped}, "
            f"unlabeled dropped {self.unlabeled_dropped}, bad {self.bad}"
        )


def _surrogate_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate such as ``\\ud800``), or ``None``.

    JSON's ``\\ud800`` escape parses to a lone surrogate: not a Unicode character, so no writer,
    tokenizer or Arrow column can encode it. A proper escape pair (``\\ud83d\\ude00``) is one
    character and fine.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return (
            f"contains a lone surrogate {bad!r} at character {exc.start} (not Unicode: half of a "
            "UTF-16 pair, e.g. from a broken \\u escape)"
        )
    return None
