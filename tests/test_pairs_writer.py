"""PairWriter across sessions: the id index (opening does not re-read the file, yet stays right
when the file changes behind it) and the bounded wait for another writer's lock."""

from __future__ import annotations

import importlib
import json
import pkgutil
import threading
import time
from pathlib import Path

import pytest

import mmalign.pairs as pairs_module
from mmalign.pairs import (
    PAIRS_JSONL,
    PairFormatError,
    PairWriter,
    PreferencePair,
    from_trl,
    read_pairs,
    record,
    write_pairs,
)


def _pair(i: int, big: int = 0) -> PreferencePair:
    return PreferencePair(id=f"p{i}", prompt="q", chosen="good " + "x" * big, rejected=f"bad {i}")


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts whole-line JSON parses done anywhere in the package (one entry per parse): every module
    of ``mmalign.pairs`` that uses the parser gets the counting one."""
    calls: list[int] = []
    real = record._parse_json_object

    def counting(text: str) -> dict:
        calls.append(len(text))
        return real(text)

    patched = []
    for info in pkgutil.iter_modules(pairs_module.__path__, prefix="mmalign.pairs."):
        module = importlib.import_module(info.name)
        if getattr(module, "_parse_json_object", None) is real:
            monkeypatch.setattr(module, "_parse_json_object", counting)
            patched.append(info.name)
    assert "mmalign.pairs.jsonl" in patched, patched  # the writer's own module
    return calls


def _write_sessions(folder: Path, n: int, big: int = 0) -> None:
    for i in range(n):  # one session per pair: the pattern that used to be quadratic
        with PairWriter(folder, durable=False) as writer:
            writer.write(_pair(i, big))


# ---------------------------------------------------------------------------------------------
# the id index


def test_reopening_reads_no_pair_line(tmp_path: Path, parses: list[int]) -> None:
    _write_sessions(tmp_path, 20, big=10_000)
    assert parses == []  # neither the index nor the writer's own lines needed a JSON parse
    with PairWriter(tmp_path) as writer:
        with pytest.raises(PairFormatError, match=r"line 21, field 'id'.*duplicate id 'p7'"):
            writer.write(_pair(7))
    assert [p.id for p in read_pairs(tmp_path)] == [f"p{i}" for i in range(20)]
    assert (tmp_path / (PAIRS_JSONL + ".ids")).is_file()


def test_index_rebuilds_without_parsing_the_writers_lines(tmp_path: Path, parses: list[int]) -> None:
    _write_sessions(tmp_path, 5, big=50_000)
    with open(tmp_path / PAIRS_JSONL, "a") as fh:  # another tool appends, in another key order
        fh.write(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "id": "hand"}) + "\n")
    with PairWriter(tmp_path) as writer:
        for dup in ("p3", "hand"):
            with pytest.raises(PairFormatError, match="duplicate id"):
                writer.write(PreferencePair(dup, "q", "a", "b"))
        writer.write(_pair(9))
    assert len(parses) == 1 and parses[0] < 200  # only the hand-written line, not the 50 kB ones


@pytest.mark.parametrize(
    "change",
    ["delete_index", "garbage_index", "lagging_index", "foreign_append", "rewrite_in_place", "replaced_file"],
)
def test_index_follows_changes_behind_the_writer(tmp_path: Path, change: str) -> None:
    _write_sessions(tmp_path, 4)
    path, index = tmp_path / PAIRS_JSONL, tmp_path / (PAIRS_JSONL + ".ids")
    expected = {"p0", "p1", "p2", "p3"}
    if change == "delete_index":
        index.unlink()
    elif change == "garbage_index":
        index.write_bytes(b"\x00\x00 not json\n")
    elif change == "lagging_index":  # a crash after the pair's write, before its index entry
        index.write_bytes(b"".join(index.read_bytes().splitlines(keepends=True)[:-1]))
    elif change == "foreign_append":
        with open(path, "a") as fh:
            fh.write(json.dumps(_pair(7).to_dict()) + "\n")
        expected.add("p7")
    elif change == "rewrite_in_place":  # same inode, other content (a hand edit)
        text = path.read_text().replace('"p1"', '"q1"')
        with open(path, "r+") as fh:
            fh.truncate(0)
            fh.write(text)
        expected = {"p0", "q1", "p2", "p3"}
    elif change == "replaced_file":
        write_pairs(tmp_path, [_pair(5), _pair(6)], overwrite=True)
        expected = {"p5", "p6"}
    with PairWriter(tmp_path) as writer:
        assert writer._ids == expected
        for pair_id in expected:
            with pytest.raises(PairFormatError, match="duplicate id"):
                writer.write(PreferencePair(pair_id, "q", "a", "b"))
        gone = {"p0", "p1", "p2", "p3"} - expected
        for pair_id in sorted(gone):
            writer.write(PreferencePair(pair_id, "q", "a", "b"))
    got = [p.id for p in read_pairs(tmp_path)]
    assert len(got) == len(set(got)) == len(expected | gone)


def test_torn_tail_is_repaired_and_indexed(tmp_path: Path) -> None:
    _write_sessions(tmp_path, 3)
    with open(tmp_path / PAIRS_JSONL, "ab") as fh:
        fh.write(b'{"id": "p9", "prompt": "q", "cho')  # a crash mid-write
    with pytest.warns(RuntimeWarning, match="torn"), PairWriter(tmp_path) as writer:
        assert writer._ids == {"p0", "p1", "p2"}
        writer.write(_pair(9))  # the torn pair's id is free again
    assert [p.id for p in read_pairs(tmp_path)] == ["p0", "p1", "p2", "p9"]


def test_unterminated_complete_tail_is_indexed(tmp_path: Path) -> None:
    (tmp_path / PAIRS_JSONL).write_text(json.dumps(_pair(0).to_dict()))  # no final newline
    with PairWriter(tmp_path) as writer:
        with pytest.raises(PairFormatError, match=r"line 2, field 'id'.*duplicate"):
            writer.write(_pair(0))


def test_odd_ids_and_layouts_are_read_right(tmp_path: Path) -> None:
    odd = ['quote " and \\ back', "ünïcödé ✓", "x" * 6000, "comma, }brace"]
    with PairWriter(tmp_path) as writer:
        for pair_id in odd:
            writer.write(PreferencePair(pair_id, "q", "a", "b"))
    with open(tmp_path / PAIRS_JSONL, "a") as fh:
        fh.write("\n")  # a blank line counts as a line
        fh.write(json.dumps({"id": "spaced", "prompt": "q", "chosen": "a", "rejected": "b"}, indent=None,
                            separators=(",", ":")) + "\n")
        fh.write('{"id": "broken", "prompt": \n')  # not JSON, but in the writer's layout: id taken
        fh.write('{"prompt": "q", "id": "torn\n')  # another layout, not JSON: no id
    with PairWriter(tmp_path) as writer:
        assert writer._ids == {*odd, "spaced", "broken"} and writer._lines == 8


def test_converter_leaves_no_index_of_its_temporary_file(tmp_path: Path) -> None:
    from_trl([{"prompt": "q", "chosen": "a", "rejected": "b"}], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PAIRS_JSONL]


# ---------------------------------------------------------------------------------------------
# the lock


def test_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    first = PairWriter(tmp_path).open()
    first.write(_pair(0))
    result: dict[str, object] = {}

    def second() -> None:
        start = time.monotonic()
        with PairWriter(tmp_path, lock_timeout=30) as writer:
            result["waited"] = time.monotonic() - start
            writer.write(_pair(1))

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # blocked on the lock, not failed
    first.write(_pair(2))
    first.close()
    thread.join(timeout=30)
    assert not thread.is_alive() and result["waited"] >= 0.4
    assert [p.id for p in read_pairs(tmp_path)] == ["p0", "p2", "p1"]


def test_lock_wait_is_bounded(tmp_path: Path) -> None:
    with PairWriter(tmp_path):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"another PairWriter holds .*pairs.jsonl \(waited 0.3 s"):
            PairWriter(tmp_path, lock_timeout=0.3).open()
        assert 0.3 <= time.monotonic() - start < 5
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="another PairWriter"):
            PairWriter(tmp_path, lock_timeout=0).open()
        assert time.monotonic() - start < 0.25
    with pytest.raises(ValueError, match="lock_timeout"):
        PairWriter(tmp_path, lock_timeout=-1)


def test_write_image_pairs_fixture_writes_a_decodable_image_dataset(tmp_path: Path, write_image_pairs) -> None:
    """The shared helper of tests/conftest.py: pairs p0.. read back with their folder, every image decodes,
    and the chosen side is the brighter one as asked."""
    import numpy as np

    from mmalign.pairs import check_media

    pairs = write_image_pairs(tmp_path / "ds", 3, chosen=0.8, rejected=0.2, size=(16, 8))
    assert [p.id for p in pairs] == ["p0", "p1", "p2"] and all(p.root == tmp_path / "ds" for p in pairs)
    report = check_media(tmp_path / "ds", progress=False)
    assert report.files == 6 and report.bad == 0
    chosen, rejected = pairs[1].load_images()
    assert chosen[0].size == (16, 8)
    assert np.asarray(chosen[0]).mean() > 150 > 100 > np.asarray(rejected[0]).mean()
    assert read_pairs(tmp_path / "ds") == pairs
