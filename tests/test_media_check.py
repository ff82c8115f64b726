"""Media integrity: the decode check before training, bad media named by file, pair and line,
symlink loops, and the size-aware image loader (JPEG draft, integer reduce, a pixel cap)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.pairs import (
    MAX_PIXELS,
    MediaError,
    PairDataset,
    PairFormatError,
    PreferencePair,
    check_media,
    load_image,
    read_pairs,
    read_pairs_report,
)

# PIL warns above 89.5 M pixels; the loader's own cap (MAX_PIXELS) is what these tests check
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _png(color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid CRCs) with one tiny IDAT: it opens
    (header only) without allocating the pixels, so huge sizes cost nothing to test."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b""
    )


def _corrupt_crc_png() -> bytes:
    data = bytearray(_png(size=(16, 16)))
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # a byte inside the compressed data: the chunk CRC no longer matches
    return bytes(data)


BAD_MEDIA = {
    "truncated": lambda: _png(size=(64, 64))[:-30],
    "zero_bytes": lambda: b"",
    "not_an_image": lambda: b"caption: a red cube\n",
    "corrupt_crc": _corrupt_crc_png,
    "huge_20000": lambda: _png_header_only(20_000, 20_000),
    "over_cap": lambda: _png_header_only(12_000, 12_000),  # 144 M pixels: under PIL's bomb error
}


def _dataset(folder: Path, bad: dict[str, bytes] | None = None, n_good: int = 3) -> Path:
    """``n_good`` good pairs (p0..), then one pair per bad file (``bad_<name>``), chosen side bad."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    (folder / "media" / "ok.png").write_bytes(_png())
    rows = []
    for i in range(n_good):
        (folder / "media" / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
        rows.append({"id": f"p{i}", "prompt": "q", "chosen": "a", "rejected": "b",
                     "chosen_media": [f"media/{i}.png"], "rejected_media": ["media/ok.png"]})
    for name, data in (bad or {}).items():
        (folder / "media" / f"{name}.png").write_bytes(data)
        rows.append({"id": f"bad_{name}", "prompt": "q", "chosen": "a", "rejected": "b",
                     "chosen_media": ["media/ok.png"], "rejected_media": [f"media/{name}.png"]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ---------------------------------------------------------------------------------------------
# the check


@pytest.mark.parametrize("kind", sorted(BAD_MEDIA))
def test_reader_accepts_bad_media_that_check_media_rejects(tmp_path: Path, kind: str) -> None:
    folder = _dataset(tmp_path / "ds", {kind: BAD_MEDIA[kind]()})
    pairs = read_pairs(folder)  # the reader only checks that the files exist
    assert len(pairs) == 4
    with pytest.raises(PairFormatError) as info:
        check_media(pairs, progress=False)
    err = info.value
    assert err.source == str(folder / "pairs.jsonl") and err.line == 4
    assert err.field == "rejected_media[0]"
    message = str(err)
    assert f"pair 'bad_{kind}'" in message and f"{kind}.png" in message and "line 4" in message


def test_huge_images_are_named_with_the_limit(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", {"over_cap": BAD_MEDIA["over_cap"]()})
    with pytest.raises(PairFormatError, match=r"12000x12000.*max_pixels"):
        check_media(read_pairs(folder), progress=False)
    assert MAX_PIXELS < 12_000 * 12_000 and MAX_PIXELS >= 10_000 * 10_000
    # the cap is a parameter
    assert check_media(read_pairs(folder), max_pixels=12_000 * 12_000, progress=False, skip_bad=True).bad == 1


def test_check_media_skip_bad_counts_and_keeps_good_pairs(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", {k: f() for k, f in BAD_MEDIA.items()})
    report = check_media(read_pairs(folder), skip_bad=True, progress=False, workers=3)
    assert [p.id for p in report.pairs] == ["p0", "p1", "p2"]
    assert report.bad == len(BAD_MEDIA) and report.files == 4 + len(BAD_MEDIA)
    assert sorted(row.line for row in report.skipped) == list(range(4, 4 + len(BAD_MEDIA)))
    assert all(row.field == "rejected_media[0]" and row.reason.startswith("pair 'bad_") for row in report.skipped)
    assert "bad " + str(len(BAD_MEDIA)) in str(report)


def test_check_media_error_counts_the_other_bad_files(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", {"truncated": BAD_MEDIA["truncated"](), "zero_bytes": b""})
    with pytest.raises(PairFormatError, match=r"1 more bad pair.*2 bad media file.*skip_bad=True") as info:
        check_media(folder, progress=False)
    assert info.value.line == 4  # the first bad pair in file order, whatever thread finished first


def test_check_media_on_a_pair_dataset_drops_bad_pairs_in_place(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", {"zero_bytes": b""})
    dataset = PairDataset(folder)
    report = check_media(dataset, skip_bad=True, progress=False)
    assert len(dataset) == 3 and [p.id for p in dataset.pairs] == [p.id for p in report.pairs]
    assert len(dataset.skipped) == 1 and dataset.skipped[0].line == 4


def test_check_media_decodes_each_file_once_and_shows_progress(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = _dataset(tmp_path / "ds", n_good=5)
    report = check_media(folder, progress=True)
    assert report.files == 6 and report.bad == 0 and len(report.pairs) == 5  # ok.png is on every pair
    assert "checking media" in capsys.readouterr().err


def test_check_media_on_a_folder_counts_missing_files_and_bad_rows(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", n_good=2)
    with open(folder / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "gone", "prompt": "q", "chosen": "a", "rejected": "b",
                             "chosen_media": ["media/gone.png"]}) + "\n")
        fh.write("{not json}\n")
    report = check_media(folder, skip_bad=True, progress=False)
    assert [p.id for p in report.pairs] == ["p0", "p1"]
    assert sorted((row.line, row.field) for row in report.skipped) == [(3, "chosen_media[0]"), (4, None)]
    with pytest.raises(PairFormatError, match=r"line 3, field 'chosen_media\[0\]': pair 'gone'.*gone\.png"):
        check_media(read_pairs(folder, check_media="none", skip_bad=True), progress=False)


def test_truncation_is_caught_in_threads_whatever_pil_is_told(tmp_path: Path) -> None:
    from PIL import ImageFile

    folder = _dataset(tmp_path / "ds", {f"t{i}": BAD_MEDIA["truncated"]() for i in range(6)}, n_good=6)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # set elsewhere in a process, e.g. by another library
    try:
        report = check_media(folder, skip_bad=True, progress=False, workers=4)
        assert report.bad == 6 and len(report.pairs) == 6
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored once the last decode finished
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_check_media_names_item_for_pairs_built_in_memory(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds", {"zero_bytes": b""}, n_good=0)
    pair = PreferencePair("mem", "q", "a", "b", ["media/zero_bytes.png"], [])
    with pytest.raises(PairFormatError, match=r"<pairs>, item 1, field 'chosen_media\[0\]': pair 'mem'"):
        check_media([pair], root=folder, progress=False)
    with pytest.raises(ValueError, match="root"):
        check_media([pair], progress=False)


# ---------------------------------------------------------------------------------------------
# symlink loops and other OS errors


def _loop_folder(tmp_path: Path) -> Path:
    folder = _dataset(tmp_path / "ds")
    (folder / "media" / "loop1.png").symlink_to("loop2.png")
    (folder / "media" / "loop2.png").symlink_to("loop1.png")
    with open(folder / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "looped", "prompt": "q", "chosen": "a", "rejected": "b",
                             "chosen_media": ["media/ok.png"], "rejected_media": ["media/loop1.png"]}) + "\n")
    return folder


def test_symlink_loop_is_a_bad_media_error(tmp_path: Path) -> None:
    folder = _loop_folder(tmp_path)
    with pytest.raises(PairFormatError) as info:
        read_pairs(folder)
    assert (info.value.line, info.value.field) == (4, "rejected_media[0]")
    assert "pair 'looped'" in str(info.value)
    assert "symlink loop" in str(info.value) and "loop1.png" in str(info.value)
    pairs, skipped = read_pairs_report(folder, skip_bad=True)
    assert len(pairs) == 3 and len(skipped) == 1 and skipped[0].field == "rejected_media[0]"
    with pytest.raises(PairFormatError, match="symlink loop"):
        read_pairs(folder, check_media="decode")


def test_symlink_loop_in_check_media_names_the_pair(tmp_path: Path) -> None:
    folder = _loop_folder(tmp_path)
    pairs = read_pairs(folder, check_media="none")
    with pytest.raises(PairFormatError, match=r"line 4, field 'rejected_media\[0\]': pair 'looped'.*symlink loop.*1 bad media file"):
        check_media(pairs, progress=False)
    report = check_media(pairs, skip_bad=True, progress=False)
    assert report.bad == 1 and len(report.pairs) == 3


def test_unreadable_media_is_a_bad_media_error(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "ds")
    (folder / "media" / "dir.png").mkdir()  # a folder where a file is expected: read raises OSError
    pairs = read_pairs(folder)
    pairs[0].chosen_media = ["media/dir.png"]
    with pytest.raises(PairFormatError, match=r"pair 'p0'.*dir\.png"):
        check_media(pairs, progress=False)


# ---------------------------------------------------------------------------------------------
# the size-aware loader


def test_load_image_jpeg_draft_decodes_at_the_size_needed(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg((1600, 1200)))
    full = load_image(path)
    assert full.size == (1600, 1200)
    small = load_image(path, min_side=100)
    assert small.size == (200, 150)  # 1/8 scale: the smallest DCT scale with both sides >= what is needed
    assert small.info["mmalign_original_size"] == (1600, 1200)
    assert load_image(path, min_side=400).size == (800, 600)  # 1/2: 1/4 would give a 300-px short side
    assert load_image(path, min_side=2000).size == (1600, 1200)  # never upscaled
    # DCT scaling is a good downscale: close to a resize of the full decode
    ref = np.asarray(full.resize((200, 150), Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(small, dtype=np.float64) - ref).mean() < 12


def test_load_image_reduces_other_formats_by_an_integer_factor(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (900, 300), (10, 200, 30)).save(path)
    img = load_image(path, min_side=64)
    assert img.size == (225, 75)  # reduce(4): the short side stays >= 64
    assert img.getpixel((5, 5)) == (10, 200, 30)
    assert img.info["mmalign_original_size"] == (900, 300)


def test_load_image_pixel_cap(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(_png(size=(40, 30)))
    assert load_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(MediaError, match=r"40x30 = 1,200 pixels.*max_pixels=1,199"):
        load_image(path, max_pixels=1199)
    with pytest.raises(MediaError, match=r"max_pixels.*400000000 pixels"):
        load_image(_png_header_only(20_000, 20_000))


def test_truncated_jpeg_is_rejected_even_at_draft_scale(tmp_path: Path) -> None:
    data = _jpeg((800, 600))
    with pytest.raises(MediaError, match="truncated"):
        load_image(data[: len(data) // 2], min_side=16)


# ---------------------------------------------------------------------------------------------
# the training commands check before the first step


def test_diffusion_training_names_the_bad_pair_before_any_step(tmp_path: Path) -> None:
    from diffusion.train import DiffusionTrainConfig, run
    from mmalign.config import load_config

    folder = _dataset(tmp_path / "ds", {"truncated": BAD_MEDIA["truncated"]()})
    configs = Path(__file__).resolve().parents[1] / "scripts" / "configs"
    config = load_config(DiffusionTrainConfig, [
        "--config", str(configs / "sd15_diffusion_dpo.yaml"), "--tiny", "true", "--data", str(folder),
        "--output_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "2", "--train.grad_accum", "1",
        "--train.progress", "false", "--train.trackers", "[]", "--train.plot", "false",
    ])
    with pytest.raises(PairFormatError, match=r"line 4, field 'rejected_media\[0\]': pair 'bad_truncated'"):
        run(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_vlm_training_names_the_bad_pair_before_any_step(tmp_path: Path, tiny_llava_path: Path) -> None:
    from mmalign.config import load_config
    from vision.train import VLMTrainConfig, run

    folder = _dataset(tmp_path / "ds", {"zero_bytes": b""})
    config = load_config(VLMTrainConfig, [
        "--model", str(tiny_llava_path), "--data", str(folder), "--train.output_dir", str(tmp_path / "run"),
        "--train.max_steps", "2", "--train.batch_size", "2", "--train.progress", "false",
        "--train.plot", "false", "--train.trackers", "[]",
    ])
    with pytest.raises(PairFormatError, match=r"line 4, field 'rejected_media\[0\]': pair 'bad_zero_bytes'.*empty"):
        run(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
