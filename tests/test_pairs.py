"""Tests for mmalign.pairs: the record, dataset I/O, crash safety, bad input and converters."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.pairs import (
    PAIRS_JSONL,
    MediaError,
    PairDataset,
    PairFormatError,
    PairWriter,
    PreferencePair,
    add_media,
    check_rel_path,
    flatten_messages,
    from_hf_dataset,
    from_pickapic,
    from_povid,
    from_stic,
    from_trl,
    load_image,
    read_pairs,
    read_pairs_report,
    resolve_media,
    to_hf_dataset,
    to_pickapic,
    to_trl,
    write_pairs,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(sum(color))
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = color[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _text_pair(i: int, **kw: object) -> PreferencePair:
    return PreferencePair(id=f"p{i}", prompt=f"question {i}", chosen=f"good {i}", rejected=f"bad {i}", **kw)


def _media_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    (folder / "media").mkdir(parents=True)
    (folder / "media" / "a.png").write_bytes(_png((255, 0, 0)))
    (folder / "media" / "b.png").write_bytes(_png((0, 0, 255)))
    return folder


def _write_lines(folder: Path, rows: list[object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PAIRS_JSONL
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "g", "prompt": "p", "chosen": "a", "rejected": "b"}


# ---------------------------------------------------------------------------------------------
# the record


def test_pair_to_from_dict_round_trip() -> None:
    pair = PreferencePair(
        id="x",
        prompt="a cat",
        chosen="",
        rejected="",
        chosen_media=["media/./a.png"],
        rejected_media=["media/b.png"],
        chosen_caption="a red cat",
        rejected_caption="a blue cat",
        label=0.5,
        meta={"k": [1, 2]},
    )
    assert pair.chosen_media == ["media/a.png"]  # normalised POSIX form
    data = pair.to_dict()
    assert set(data) == {
        "id", "prompt", "chosen", "rejected", "chosen_media", "rejected_media",
        "chosen_caption", "rejected_caption", "label", "meta",
    }  # fmt: skip
    again = PreferencePair.from_dict(json.loads(json.dumps(data)))
    assert again == pair
    assert again.label == 0.5


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        ({"prompt": "  "}, "prompt", "empty prompt"),
        ({"id": ""}, "id", "empty id"),
        ({"label": 0.7}, "label", "not one of"),
        ({"label": True}, "label", "number"),
        ({"label": float("nan")}, "label", "not one of"),
        ({"chosen_media": ["../x.png"]}, "chosen_media[0]", "leaves the dataset folder"),
        ({"rejected_media": ["/etc/passwd"]}, "rejected_media[0]", "absolute"),
        ({"rejected_media": ["C:/x.png"]}, "rejected_media[0]", "absolute"),
        ({"chosen_media": ["a\\b.png"]}, "chosen_media[0]", "backslash"),
        ({"chosen_media": "a.png"}, "chosen_media", "list"),
        ({"meta": {"x": object()}}, "meta", "JSON"),
        ({"chosen": "", "chosen_media": []}, "chosen", "empty"),
        ({"rejected": "good"}, "rejected", "identical"),
    ],
)
def test_pair_validation(kwargs: dict, field: str, needle: str) -> None:
    base = {"id": "x", "prompt": "q", "chosen": "good", "rejected": "bad"}
    base.update(kwargs)
    with pytest.raises(PairFormatError) as info:
        PreferencePair(**base)
    assert info.value.field == field
    assert needle in str(info.value)


def test_from_dict_missing_unknown_and_null_fields() -> None:
    with pytest.raises(PairFormatError, match="field 'rejected': missing"):
        PreferencePair.from_dict({"id": "a", "prompt": "p", "chosen": "c"})
    with pytest.raises(PairFormatError, match="unknown field"):
        PreferencePair.from_dict({**GOOD, "chosen_image": "a.png"})
    with pytest.raises(PairFormatError, match="field 'label': must not be null"):
        PreferencePair.from_dict({**GOOD, "label": None})


def test_oriented_swaps_label_zero() -> None:
    pair = PreferencePair("x", "q", "A", "B", ["a.png"], ["b.png"], "ca", "cb", label=0.0)
    flipped = pair.oriented()
    assert (flipped.chosen, flipped.rejected) == ("B", "A")
    assert (flipped.chosen_media, flipped.rejected_media) == (["b.png"], ["a.png"])
    assert (flipped.chosen_caption, flipped.rejected_caption) == ("cb", "ca")
    assert flipped.label == 1.0 and flipped.meta["swapped_from_label_0"] is True
    same = _text_pair(1)
    assert same.oriented() is same


def test_check_rel_path_and_resolve(tmp_path: Path) -> None:
    assert check_rel_path("a//b/./c.png") == "a/b/c.png"
    for bad in ["", ".", "..", "a/../../b", "/abs", "x\x00y"]:
        with pytest.raises(PairFormatError):
            check_rel_path(bad)
    folder = _media_folder(tmp_path)
    assert resolve_media(folder, "media/a.png") == (folder / "media/a.png").resolve()


def test_symlink_leaving_folder_is_rejected(tmp_path: Path) -> None:
    folder = _media_folder(tmp_path)
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png((1, 2, 3)))
    os.symlink(outside, folder / "media" / "link.png")
    with pytest.raises(PairFormatError, match="outside the dataset folder"):
        resolve_media(folder, "media/link.png")
    assert resolve_media(folder, "media/link.png", follow_symlinks=True).exists()
    _write_lines(folder, [{**GOOD, "chosen_media": ["media/link.png"]}])
    with pytest.raises(PairFormatError) as info:
        read_pairs(folder)
    assert info.value.line == 1 and info.value.field == "chosen_media[0]"


# ---------------------------------------------------------------------------------------------
# load_image


def test_load_image_modes(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), "L")
    notes: list[str] = []
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    img = load_image(buf.getvalue(), notes=notes)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert img.getpixel((0, 0)) == (77, 77, 77)
    assert notes == ["converted grayscale (L) to RGB"]

    # RGBA: alpha composited on white. Pixel (0, 0, 0, 0) -> white; (200, 0, 0, 255) -> (200, 0, 0);
    # (0, 0, 0, 128) -> 255 * (1 - 128/255) = 127 (rounded) on each channel.
    arr = np.array([[[0, 0, 0, 0], [200, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (200, 0, 0)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((2, 0)))
    assert "RGBA" in img.info["mmalign_note"]

    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, format="JPEG", quality=95)
    notes = []
    img = load_image(path, notes=notes)
    assert img.mode == "RGB" and "CMYK" in notes[0]
    r, g, b = img.getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60

    i16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))  # 16-bit white -> 255
    path = tmp_path / "i16.png"
    i16.save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_load_image_rejects_truncated_and_garbage(tmp_path: Path) -> None:
    data = _jpeg((10, 20, 30), size=(64, 64))
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # someone else's global setting must not hide truncation
    try:
        with pytest.raises(MediaError, match="trunc.jpg"):
            load_image(trunc)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    png = _png((1, 2, 3), size=(40, 40))
    with pytest.raises(MediaError):
        load_image(png[: len(png) - 30])
    with pytest.raises(MediaError):
        load_image(b"not an image at all")
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="cannot read"):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------
# JSONL, parquet, datasets round trips


def _media_pairs() -> list[PreferencePair]:
    return [
        PreferencePair("d0", "a red square", "", "", ["media/a.png"], ["media/b.png"], "red", "blue"),
        _text_pair(1, chosen_media=["media/a.png"], rejected_media=["media/b.png"], meta={"src": "x"}),
        _text_pair(2, label=0.5),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    if fmt == "hf":
        pytest.importorskip("datasets")
    folder = _media_folder(tmp_path)
    pairs = _media_pairs()
    write_pairs(folder, pairs, format=fmt)
    back = read_pairs(folder, check_media="decode")
    assert back == pairs
    assert all(p.root == folder for p in back)
    chosen, rejected = back[0].load_images()
    assert chosen[0].getpixel((0, 0)) == (255, 0, 0) and rejected[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(FileExistsError):
        write_pairs(folder, pairs, format=fmt)
    write_pairs(folder, pairs[:1], format=fmt, overwrite=True)
    assert read_pairs(folder) == pairs[:1]


def test_hf_in_memory_round_trip() -> None:
    pytest.importorskip("datasets")
    pairs = [_text_pair(0), _text_pair(1, meta={"a": 1})]
    ds = to_hf_dataset(pairs)
    assert ds.column_names[:4] == ["id", "prompt", "chosen", "rejected"]
    back, skipped = from_hf_dataset(ds)
    assert back == pairs and skipped == []


def test_parquet_row_errors_name_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    rows = [{**GOOD, "meta": "{}"}, {**GOOD, "id": "h", "prompt": "", "meta": "{}"}]
    pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    with pytest.raises(PairFormatError) as info:
        read_pairs(folder)
    assert "pairs.parquet" in str(info.value) and "row 2" in str(info.value)
    assert info.value.field == "prompt"


def test_several_formats_is_ambiguous(tmp_path: Path) -> None:
    write_pairs(tmp_path, [_text_pair(0)])
    write_pairs(tmp_path, [_text_pair(0)], format="parquet")
    with pytest.raises(ValueError, match="several"):
        read_pairs(tmp_path)
    assert read_pairs(tmp_path, format="parquet") == [_text_pair(0)]


def test_real_photos_as_media(tmp_path: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path / "photos"
    with PairWriter(folder) as writer:
        astro = writer.add_media(skdata.astronaut(), "media/astronaut.png")
        coffee = writer.add_media(Image.fromarray(skdata.coffee()), "media/coffee.jpg")
        camera = writer.add_media(skdata.camera(), "media/camera.png")  # grayscale (512, 512)
        writer.write(PreferencePair("0", "an astronaut", "", "", [astro], [coffee]))
        writer.write(
            PreferencePair("1", "a photographer", "a man with a camera", "a cup", [camera], [camera])
        )
    pairs = read_pairs(folder, check_media="decode")
    chosen, rejected = pairs[0].load_images()
    assert chosen[0].size == (512, 512) and rejected[0].size == (600, 400)
    assert np.array_equal(np.asarray(chosen[0]), skdata.astronaut())  # PNG is lossless
    cam, _ = pairs[1].load_images()
    assert cam[0].mode == "RGB" and "grayscale" in cam[0].info["mmalign_note"]
    assert np.array_equal(np.asarray(cam[0])[..., 1], skdata.camera())
    # adding the same bytes again is a no-op; different bytes under the same name raise
    assert add_media(folder, skdata.astronaut(), "media/astronaut.png") == "media/astronaut.png"
    with pytest.raises(FileExistsError):
        add_media(folder, skdata.chelsea(), "media/astronaut.png")


# ---------------------------------------------------------------------------------------------
# PairWriter: appending, duplicates, crash


def test_append_across_sessions(tmp_path: Path) -> None:
    with PairWriter(tmp_path) as writer:
        writer.write(_text_pair(0))
        writer.write(_text_pair(1))
    with PairWriter(tmp_path) as writer:
        writer.write(_text_pair(2))
        with pytest.raises(PairFormatError, match="duplicate id 'p0'"):
            writer.write(_text_pair(0))
    write_pairs(tmp_path, [_text_pair(3)], append=True)
    assert [p.id for p in read_pairs(tmp_path)] == ["p0", "p1", "p2", "p3"]
    assert (tmp_path / PAIRS_JSONL).read_bytes().count(b"\n") == 4


def test_writer_checks_media_and_lock(tmp_path: Path) -> None:
    folder = _media_folder(tmp_path)
    with PairWriter(folder) as writer:
        with pytest.raises(PairFormatError, match="not found"):
            writer.write(_text_pair(0, chosen_media=["media/nope.png"], rejected_media=["media/b.png"]))
        with pytest.raises(RuntimeError, match="another PairWriter"):
            PairWriter(folder, lock_timeout=0).open()
        with pytest.raises(RuntimeError, match="another PairWriter"):
            write_pairs(folder, [_text_pair(1)], overwrite=True, lock_timeout=0)
    assert read_pairs(folder) == []


def test_crash_torn_last_line(tmp_path: Path) -> None:
    """A torn last line is never read as a pair: readers error (or skip), the writer repairs."""
    with PairWriter(tmp_path) as writer:
        writer.write(_text_pair(0))
        writer.write(_text_pair(1))
    path = tmp_path / PAIRS_JSONL
    full = json.dumps(_text_pair(2).to_dict()) + "\n"
    with open(path, "ab") as fh:  # simulate a crash in the middle of the third write
        fh.write(full[: len(full) // 2].encode())
    with pytest.raises(PairFormatError) as info:
        read_pairs(tmp_path)
    assert info.value.line == 3 and "torn last line" in str(info.value) and PAIRS_JSONL in str(info.value)
    pairs, skipped = read_pairs_report(tmp_path, skip_bad=True)
    assert [p.id for p in pairs] == ["p0", "p1"] and len(skipped) == 1 and skipped[0].line == 3

    with pytest.warns(RuntimeWarning, match="torn last line"), PairWriter(tmp_path) as writer:
        assert writer.repaired == full[: len(full) // 2].encode()
        writer.write(_text_pair(2))  # the id was never committed, so it is free
    assert [p.id for p in read_pairs(tmp_path)] == ["p0", "p1", "p2"]
    assert (tmp_path / (PAIRS_JSONL + ".torn")).read_bytes() == full[: len(full) // 2].encode() + b"\n"


def test_complete_last_line_without_newline(tmp_path: Path) -> None:
    """A hand-written file whose last line lacks '\\n' but is complete JSON is read and completed."""
    path = tmp_path / PAIRS_JSONL
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "h"}))
    assert [p.id for p in read_pairs(tmp_path)] == ["g", "h"]
    with PairWriter(tmp_path) as writer:
        assert writer.repaired is None
        writer.write(_text_pair(9))
    assert [p.id for p in read_pairs(tmp_path)] == ["g", "h", "p9"]


# ---------------------------------------------------------------------------------------------
# bad input in a dataset folder: each error names file, line and field


BAD_CASES = [
    ({"id": "b", "prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({**GOOD, "id": "b", "prompt": ""}, "prompt", "empty prompt"),
    ({**GOOD, "id": "b", "label": 2}, "label", "not one of"),
    ({**GOOD, "id": "b", "chosen_media": ["../outside.png"]}, "chosen_media[0]", "leaves the dataset folder"),
    ({**GOOD, "id": "b", "rejected_media": ["/tmp/x.png"]}, "rejected_media[0]", "absolute"),
    ({**GOOD, "id": "b", "chosen_media": ["media/missing.png"]}, "chosen_media[0]", "not found"),
    ('{"id": "b", "prompt": "p", "chosen": "a", ', None, "invalid JSON"),
    ("[1, 2]", None, "JSON object"),
    ('{"id": "b", "id": "c", "prompt": "p", "chosen": "a", "rejected": "b"}', None, "duplicate key"),
    ('{"id": "b", "prompt": "p", "chosen": "a", "rejected": "c", "label": NaN}', None, "non-finite"),
    ({**GOOD}, "id", "duplicate id"),
]


@pytest.mark.parametrize(("row", "field", "needle"), BAD_CASES)
def test_bad_row_errors(tmp_path: Path, row: object, field: str | None, needle: str) -> None:
    folder = _media_folder(tmp_path)
    path = _write_lines(folder, [GOOD, "", row, {**GOOD, "id": "z"}])  # blank line 2 counts
    with pytest.raises(PairFormatError) as info:
        read_pairs(folder)
    err = info.value
    assert err.line == 3 and err.field == field
    assert str(path) in str(err) and "line 3" in str(err) and needle in str(err)
    pairs, skipped = read_pairs_report(folder, skip_bad=True)
    assert [p.id for p in pairs] == ["g", "z"]
    assert len(skipped) == 1 and skipped[0].line == 3 and skipped[0].field == field
    assert needle in skipped[0].reason


def test_truncated_image_in_dataset(tmp_path: Path) -> None:
    folder = _media_folder(tmp_path)
    data = _jpeg((9, 9, 9), size=(64, 64))
    (folder / "media" / "trunc.jpg").write_bytes(data[: len(data) // 2])
    _write_lines(folder, [GOOD, {**GOOD, "id": "t", "chosen_media": ["media/trunc.jpg"]}])
    assert len(read_pairs(folder)) == 2  # "exists" does not decode
    with pytest.raises(PairFormatError) as info:
        read_pairs(folder, check_media="decode")
    assert info.value.line == 2 and info.value.field == "chosen_media[0]" and "trunc.jpg" in str(info.value)
    pairs, skipped = read_pairs_report(folder, check_media="decode", skip_bad=True)
    assert [p.id for p in pairs] == ["g"] and skipped[0].field == "chosen_media[0]"


def test_invalid_utf8_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / PAIRS_JSONL).write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(PairFormatError, match="line 2: not valid UTF-8"):
        read_pairs(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no pair dataset"):
        read_pairs(tmp_path / "empty")


def test_orient_on_read(tmp_path: Path) -> None:
    _write_lines(tmp_path, [{**GOOD, "label": 0}])
    (pair,) = read_pairs(tmp_path)
    assert (pair.chosen, pair.rejected, pair.label) == ("b", "a", 1.0)
    (raw,) = read_pairs(tmp_path, orient=False)
    assert (raw.chosen, raw.label) == ("a", 0.0)


# ---------------------------------------------------------------------------------------------
# PairDataset


def test_pair_dataset(tmp_path: Path) -> None:
    import torch

    folder = _media_folder(tmp_path)
    write_pairs(folder, _media_pairs())
    ds = PairDataset(folder)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 3
    assert ds[0].id == "d0" and ds.root == folder
    chosen, rejected = ds.load_images(0)
    assert chosen[0].mode == "RGB"
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1] and isinstance(batches[0][0], PreferencePair)
    mem = PairDataset(_media_pairs(), root=folder)
    assert len(mem) == 3 and mem[1].root == folder
    with pytest.raises(PairFormatError, match="not found"):
        PairDataset([_text_pair(0, chosen_media=["media/none.png"])], root=folder)


# ---------------------------------------------------------------------------------------------
# converters


def _pickapic_rows(tmp_path: Path) -> tuple[list[dict], dict[str, bytes]]:
    imgs = {name: _png(color) for name, color in [("r", (255, 0, 0)), ("g", (0, 255, 0)), ("b", (0, 0, 255))]}
    src = tmp_path / "src"
    src.mkdir()
    (src / "blue.png").write_bytes(imgs["b"])
    rows = [
        {"caption": "red wins", "jpg_0": imgs["r"], "jpg_1": imgs["g"], "label_0": 1.0, "ranking_id": 10},
        {"caption": "blue wins", "jpg_0": imgs["g"], "jpg_1": "blue.png", "label_0": 0.0, "label_1": 1.0},
        {"caption": "tie one", "jpg_0": imgs["r"], "jpg_1": imgs["b"], "label_0": 0.5},
        {
            "caption": "tie two",
            "jpg_0": {"bytes": imgs["g"], "path": None},
            "jpg_1": imgs["b"],
            "label_0": 0.5,
        },
        {"caption": "no label", "jpg_0": imgs["g"], "jpg_1": imgs["b"], "label_0": 1.0, "has_label": False},
    ]
    return rows, imgs


def test_pickapic_ties_dropped_and_counted(tmp_path: Path) -> None:
    rows, imgs = _pickapic_rows(tmp_path)
    report = from_pickapic(rows, tmp_path / "out", image_root=tmp_path / "src")
    assert (report.kept, report.ties_dropped, report.unlabeled_dropped, report.bad) == (2, 2, 1, 0)
    pairs = read_pairs(tmp_path / "out", check_media="decode")
    assert [p.prompt for p in pairs] == ["red wins", "blue wins"]
    assert pairs[0].id == "10" and pairs[1].id == "pickapic-2"
    # label_0 = 0 means image 1 (blue, given by path) is chosen
    chosen, rejected = pairs[1].load_images()
    assert chosen[0].getpixel((0, 0)) == (0, 0, 255) and rejected[0].getpixel((0, 0)) == (0, 255, 0)
    assert pairs[1].meta["chosen_index"] == 1 and pairs[1].label == 1.0
    assert pairs[0].chosen == "" and pairs[0].chosen_caption is None
    # the red image is stored once (content addressed) though used twice
    assert len(list((tmp_path / "out" / "media").iterdir())) == 3

    kept = from_pickapic(rows, tmp_path / "ties", image_root=tmp_path / "src", keep_ties=True)
    assert (kept.kept, kept.ties_dropped) == (4, 0)
    ties = [p for p in read_pairs(tmp_path / "ties") if p.label == 0.5]
    assert [p.prompt for p in ties] == ["tie one", "tie two"]

    # the same rows from a parquet file (jpg columns as binary, or HF-style {"bytes", "path"} structs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table_rows = [{**r, "jpg_1": imgs["b"] if r["jpg_1"] == "blue.png" else r["jpg_1"]} for r in rows]
    table_rows = [
        {**r, "jpg_0": r["jpg_0"]["bytes"] if isinstance(r["jpg_0"], dict) else r["jpg_0"]}
        for r in table_rows
    ]
    keys = sorted({k for r in table_rows for k in r})  # from_pylist takes its columns from row 1
    table_rows = [{k: r.get(k) for k in keys} for r in table_rows]
    pq.write_table(pa.Table.from_pylist(table_rows), tmp_path / "train-0000.parquet")
    from_parquet = from_pickapic(tmp_path / "train-0000.parquet", tmp_path / "pq")
    assert (from_parquet.kept, from_parquet.ties_dropped, from_parquet.unlabeled_dropped) == (2, 2, 1)
    assert read_pairs(tmp_path / "pq") == pairs

    back = to_pickapic(pairs)
    assert back[1]["jpg_0"] == imgs["b"] and back[1]["label_0"] == 1.0 and back[1]["label_1"] == 0.0


def test_pickapic_bad_rows(tmp_path: Path) -> None:
    rows, imgs = _pickapic_rows(tmp_path)
    bad = [
        {"caption": "x", "jpg_0": imgs["r"], "jpg_1": imgs["g"], "label_0": 0.3},
        {"caption": "x", "jpg_0": imgs["r"], "jpg_1": imgs["g"], "label_0": 1, "label_1": 1},
        {"caption": "x", "jpg_0": imgs["r"][:40], "jpg_1": imgs["g"], "label_0": 1},
        {"caption": "x", "jpg_0": imgs["r"], "jpg_1": "../escape.png", "label_0": 1},
        {"caption": "", "jpg_0": imgs["r"], "jpg_1": imgs["g"], "label_0": 1},
        {"caption": "x", "jpg_1": imgs["g"], "label_0": 1},
        {"caption": "same", "jpg_0": imgs["r"], "jpg_1": imgs["r"], "label_0": 1},
    ]
    with pytest.raises(PairFormatError) as info:
        from_pickapic(rows + bad, tmp_path / "out", image_root=tmp_path / "src")
    assert info.value.line == 6 and info.value.field == "label_0"
    assert not (tmp_path / "out" / PAIRS_JSONL).exists()  # no partial dataset left behind
    report = from_pickapic(rows + bad, tmp_path / "out", image_root=tmp_path / "src", skip_bad=True)
    assert report.kept == 2 and report.bad == 7
    assert [s.field for s in report.skipped] == [
        "label_0",
        "label_1",
        "jpg_0",
        "jpg_1",
        "caption",
        "jpg_0",
        "rejected",
    ]
    assert [s.line for s in report.skipped] == [6, 7, 8, 9, 10, 11, 12]
    assert "kept 2" in str(report) and "bad 7" in str(report)


def test_dcpo_captions_follow_label(tmp_path: Path) -> None:
    r, g = _png((255, 0, 0)), _png((0, 255, 0))
    rows = [
        {
            "caption": "a fruit",
            "caption_0": "red fruit",
            "caption_1": "green fruit",
            "jpg_0": r,
            "jpg_1": g,
            "label_0": 1,
        },
        {
            "caption": "a fruit",
            "caption_0": "red apple",
            "caption_1": "green apple",
            "jpg_0": r,
            "jpg_1": g,
            "label_0": 0,
        },
        {"caption": "a fruit", "caption_0": "only one", "jpg_0": r, "jpg_1": g, "label_0": 0},
    ]
    report = from_pickapic(rows, tmp_path / "dcpo", skip_bad=True)
    assert report.kept == 2 and report.skipped[0].field == "caption_1"
    first, second = read_pairs(tmp_path / "dcpo")
    assert (first.chosen_caption, first.rejected_caption) == ("red fruit", "green fruit")
    assert (second.chosen_caption, second.rejected_caption) == ("green apple", "red apple")
    chosen, _ = second.load_images()
    assert chosen[0].getpixel((0, 0)) == (0, 255, 0)  # the caption travels with its image
    rows_back = to_pickapic([second])
    assert (rows_back[0]["caption_0"], rows_back[0]["caption_1"]) == ("green apple", "red apple")


def test_trl_standard_and_conversational(tmp_path: Path) -> None:
    png = _png((5, 6, 7))
    records = [
        {"prompt": "What colour?", "chosen": "dark", "rejected": "bright", "images": [png]},
        {
            "prompt": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
            ],
            "chosen": [{"role": "assistant", "content": "A dark square."}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
            "images": [Image.new("RGB", (4, 4), (5, 6, 7))],
        },
        {  # implicit prompt (shared turns) with a system message
            "chosen": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ],
            "rejected": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Go away."},
            ],
        },
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},  # bad: user response
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
            "chosen": "a",
            "rejected": "b",
        },  # bad: one placeholder, no image  # fmt: skip
        {"chosen": "a", "rejected": "b"},  # bad: implicit prompt on strings
    ]
    report = from_trl(records, tmp_path / "trl", skip_bad=True)
    assert report.kept == 3 and [s.field for s in report.skipped] == ["chosen", "images", "prompt"]
    pairs = read_pairs(tmp_path / "trl")
    assert pairs[0].chosen_media == pairs[0].rejected_media and len(pairs[0].chosen_media) == 1
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("Describe.", "A dark square.", "A cat.")
    assert pairs[2].prompt == "system: Be brief.\nuser: Hi?"
    assert pairs[2].meta["prompt_messages"][1] == {"role": "user", "content": "Hi?"}
    assert (pairs[2].chosen, pairs[2].rejected) == ("Hello.", "Go away.")

    recs = to_trl(pairs)
    assert recs[0]["prompt"] == "What colour?" and Path(recs[0]["images"][0]).is_file()
    assert "images" not in recs[2]
    pil = to_trl(pairs[:1], images="pil")[0]["images"][0]
    assert pil.getpixel((0, 0)) == (5, 6, 7)
    diff = PreferencePair("d", "q", "a", "b", ["media/x.png"], [])
    with pytest.raises(PairFormatError, match="TRL shares images"):
        to_trl([diff], root=tmp_path)
    with pytest.raises(PairFormatError, match="tie"):
        to_trl([_text_pair(0, label=0.5)])


def test_flatten_messages_rule() -> None:
    text, n = flatten_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert (text, n) == ("a\nb", 0)
    text, n = flatten_messages([{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}])
    assert text == "user: u\nassistant: v"


def test_stic_reader(tmp_path: Path) -> None:
    images = tmp_path / "coco"
    images.mkdir()
    (images / "COCO_1.jpg").write_bytes(_jpeg((100, 0, 0)))
    prompt = "Illustrate the details of the picture."
    recs = [
        {
            "image": "COCO_1.jpg",
            "image_corruption": True,
            "hallu_prompt": "",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A red scene."}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A dragon."}],
        },
        {
            "image": "COCO_1.jpg",
            "image_corruption": False,
            "hallu_prompt": "Describe the image with imaginative objects that may exist in the scene.",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Red."}],
            "rejected": [
                {"role": "user", "content": "Other prompt"},
                {"role": "assistant", "content": "Blue."},
            ],
        },
        {"image": "missing.jpg", "chosen": recs_ok(prompt), "rejected": recs_ok(prompt, "no")},
    ]
    src = tmp_path / "pref_data_mscoco.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = from_stic(src, tmp_path / "stic", image_root=images, skip_bad=True)
    assert report.kept == 1 and [(s.line, s.field) for s in report.skipped] == [(2, "rejected"), (3, "image")]
    (pair,) = read_pairs(tmp_path / "stic", check_media="decode")
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, "A red scene.", "A dragon.")
    assert pair.chosen_media == pair.rejected_media and pair.meta["stic_image_corruption"] is True
    assert pair.id == "stic-1"


def recs_ok(prompt: str, answer: str = "yes") -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_povid_reader_both_layouts(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "x.png").write_bytes(_png((3, 3, 3)))
    recs = [
        {
            "id": "povid-a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is here?"},
                {"from": "gpt", "value": "A dot."},
            ],
            "rejected_conversations": [
                {"from": "human", "value": "<image>\nWhat is here?"},
                {"from": "gpt", "value": "A dot and a dog."},
            ],
        },
        {"image": "x.png", "question": "Colour?", "chosen": "Grey.", "rejected": "Pink."},
        {"image": "x.png", "conversations": [{"from": "human", "value": "q"}], "rejected_conversations": []},
        {"image": "/abs/x.png", "prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    src = tmp_path / "povid.json"
    src.write_text(json.dumps(recs))
    report = from_povid(src, tmp_path / "povid", image_root=images, skip_bad=True)
    assert report.kept == 2 and [(s.line, s.field) for s in report.skipped] == [
        (3, "conversations"),
        (4, "image"),
    ]
    assert "absolute" in report.skipped[1].reason and "record 3" in str(report.skipped[0])
    first, second = read_pairs(tmp_path / "povid")
    assert (first.id, first.prompt, first.rejected) == ("povid-a", "What is here?", "A dot and a dog.")
    assert first.meta["image_tokens_removed"] == 1 and first.meta["layout"] == "llava"
    assert (second.prompt, second.chosen, second.meta["layout"]) == ("Colour?", "Grey.", "flat")


def test_converter_refuses_existing_output(tmp_path: Path) -> None:
    write_pairs(tmp_path, [_text_pair(0)])
    with pytest.raises(FileExistsError):
        from_trl([{"prompt": "q", "chosen": "a", "rejected": "b"}], tmp_path)
    report = from_trl([{"prompt": "q", "chosen": "a", "rejected": "b"}], tmp_path, overwrite=True)
    assert report.kept == 1 and [p.id for p in read_pairs(tmp_path)] == ["trl-1"]


def test_no_pickle_in_package() -> None:
    import mmalign.pairs as pkg

    files = sorted(Path(pkg.__file__).parent.glob("*.py"))
    assert len(files) > 1  # the package's modules, not only its __init__
    for path in files:
        source = path.read_text()
        assert "import pickle" not in source and "torch.load" not in source, path.name
