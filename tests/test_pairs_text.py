"""Text integrity of pairs: lone surrogates (not Unicode) and whitespace-only or whitespace-equal
responses are refused on read and on write, naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.pairs import (
    PAIRS_JSONL,
    PairFormatError,
    PairWriter,
    PreferencePair,
    from_trl,
    read_pairs,
    read_pairs_report,
    write_pairs,
    write_parquet,
)

GOOD = {"id": "g", "prompt": "p", "chosen": "a", "rejected": "b"}
SURROGATE = "\ud800"


def _write_rows(folder: Path, rows: list[dict]) -> Path:
    """JSONL as ``json.dumps`` writes it: a surrogate becomes the escape ``\\ud800``, which is
    valid JSON syntax and decodes to a lone surrogate."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PAIRS_JSONL
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    return path


# ---------------------------------------------------------------------------------------------
# lone surrogates


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"chosen": "ok " + SURROGATE}, "chosen"),
        ({"rejected": SURROGATE + "x"}, "rejected"),
        ({"prompt": "why" + SURROGATE}, "prompt"),
        ({"id": "i" + SURROGATE}, "id"),
        ({"chosen_caption": SURROGATE}, "chosen_caption"),
        ({"chosen_media": ["media/" + SURROGATE + ".png"]}, "chosen_media[0]"),
        ({"meta": {"note": ["fine", "bad " + SURROGATE]}}, "meta"),
        ({"meta": {SURROGATE: 1}}, "meta"),
    ],
)
def test_lone_surrogate_is_rejected_on_read(tmp_path: Path, row: dict, field: str) -> None:
    path = _write_rows(tmp_path / "ds", [dict(GOOD), {**GOOD, "id": "s", **row}])
    with pytest.raises(PairFormatError) as info:
        read_pairs(path.parent, check_media="none")
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 2, field)
    assert "lone surrogate" in str(err) and "\\ud800" in str(err)
    pairs, skipped = read_pairs_report(path.parent, skip_bad=True, check_media="none")
    assert [p.id for p in pairs] == ["g"] and skipped[0].line == 2 and skipped[0].field == field


def test_meta_surrogate_names_the_key_path() -> None:
    with pytest.raises(PairFormatError, match=r"meta\['note'\]\[1\].*lone surrogate"):
        PreferencePair("s", "p", "a", "b", meta={"note": ["fine", "bad " + SURROGATE]})


def test_surrogate_pairs_written_as_escapes_are_fine(tmp_path: Path) -> None:
    """A correct UTF-16 escape pair is one character (an emoji), not a lone surrogate."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / PAIRS_JSONL).write_text('{"id": "e", "prompt": "p", "chosen": "\\ud83d\\ude00", "rejected": "b"}\n')
    assert read_pairs(tmp_path / "ds")[0].chosen == "\U0001f600"


def test_lone_surrogate_is_rejected_on_write_naming_file_line_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    with PairWriter(folder) as writer:
        writer.write(PreferencePair("p0", "q", "a", "b"))
        writer.write(PreferencePair("p1", "q", "a", "b"))
        bad = PreferencePair("p2", "q", "a", "b")
        bad.rejected = "broken " + SURROGATE  # mutated after validation
        with pytest.raises(PairFormatError) as info:
            writer.write(bad)
        assert (info.value.source, info.value.line, info.value.field) == (str(folder / PAIRS_JSONL), 3, "rejected")
        writer.write(PreferencePair("p3", "q", "a", "b"))  # the writer is still usable
    assert [p.id for p in read_pairs(folder)] == ["p0", "p1", "p3"]
    with PairWriter(folder) as writer:  # a later session counts the lines already there
        with pytest.raises(PairFormatError, match=r"line 4, field 'rejected'"):
            writer.write(bad)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_lone_surrogate_is_rejected_by_whole_file_writers(tmp_path: Path, fmt: str) -> None:
    bad = PreferencePair("p1", "q", "a", "b", meta={"k": "v"})
    bad.meta["k"] = SURROGATE
    pairs = [PreferencePair("p0", "q", "a", "b"), bad]
    with pytest.raises(PairFormatError, match=r"(line|item) 2, field 'meta'.*lone surrogate"):
        write_pairs(tmp_path / "ds", pairs, format=fmt)
    assert not (tmp_path / "ds" / PAIRS_JSONL).exists()
    with pytest.raises(PairFormatError, match=r"item 2, field 'meta'"):
        write_parquet(pairs, tmp_path / "x.parquet")


def test_converter_names_record_and_field_of_a_surrogate(tmp_path: Path) -> None:
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": SURROGATE, "rejected": "b"}]
    with pytest.raises(PairFormatError, match=r"row 2, field 'chosen'.*lone surrogate"):
        from_trl(records, tmp_path / "out")
    report = from_trl(records, tmp_path / "out2", skip_bad=True)
    assert report.kept == 1 and report.bad == 1


# ---------------------------------------------------------------------------------------------
# whitespace


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"chosen": "  \n\t"}, "chosen", "whitespace only"),
        ({"rejected": " "}, "rejected", "whitespace only"),
        ({"prompt": " \n "}, "prompt", "whitespace only"),
        ({"chosen": " ", "chosen_media": ["m/a.png"]}, "chosen", "whitespace only"),
        ({"chosen": "The cat.", "rejected": " The  cat.\n"}, "rejected", "differ only in whitespace"),
    ],
)
def test_whitespace_responses_are_rejected(kwargs: dict, field: str, needle: str) -> None:
    args = {"id": "w", "prompt": "q", "chosen": "a", "rejected": "b", **kwargs}
    with pytest.raises(PairFormatError, match=needle) as info:
        PreferencePair(**args)
    assert info.value.field == field


def test_whitespace_rules_keep_legitimate_pairs() -> None:
    PreferencePair("d", "a cat", "", "", ["m/a.png"], ["m/b.png"])  # diffusion: media only
    PreferencePair("m", "q", "The cat.", "The cat.", ["m/a.png"], ["m/b.png"])  # mDPO: same answer, other image
    PreferencePair("t", "q", "The cat.", "The cat!")  # differ by a character


def test_whitespace_rows_are_skipped_and_counted_on_read(tmp_path: Path) -> None:
    path = _write_rows(tmp_path / "ds", [
        dict(GOOD), {**GOOD, "id": "w", "chosen": "   "}, {**GOOD, "id": "e", "chosen": "x y", "rejected": "x  y "},
    ])
    with pytest.raises(PairFormatError, match=r"line 2, field 'chosen'.*whitespace only"):
        read_pairs(path.parent)
    pairs, skipped = read_pairs_report(path.parent, skip_bad=True)
    assert [p.id for p in pairs] == ["g"]
    assert [(s.line, s.field) for s in skipped] == [(2, "chosen"), (3, "rejected")]
