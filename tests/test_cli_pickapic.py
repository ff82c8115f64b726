"""``mmalign make-pairs pickapic``: Pick-a-Pic rows on disk become a pair folder; bad input is a clear exit."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.pairs import read_pairs


def _png(path, colour) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def test_make_pairs_pickapic_converts_a_jsonl_file(tmp_path, capsys) -> None:  # noqa: ANN001
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "red.png", (255, 0, 0))
    _png(src / "blue.png", (0, 0, 255))
    rows = [
        {"caption": "a red square", "jpg_0": "red.png", "jpg_1": "blue.png", "label_0": 1.0},
        {"caption": "a blue square", "jpg_0": "red.png", "jpg_1": "blue.png", "label_0": 0.0},
        {"caption": "either", "jpg_0": "red.png", "jpg_1": "blue.png", "label_0": 0.5},
    ]
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs"
    assert main(["make-pairs", "pickapic", "--src", str(src / "rows.jsonl"), "--out", str(out),
                 "--image_root", str(src)]) == 0
    pairs = read_pairs(out, check_media="decode")
    assert [p.prompt for p in pairs] == ["a red square", "a blue square"]  # the tie is dropped and counted
    chosen, rejected = pairs[1].load_images()
    assert chosen[0].getpixel((0, 0)) == (0, 0, 255) and rejected[0].getpixel((0, 0)) == (255, 0, 0)
    assert "1" in capsys.readouterr().out  # the report names the dropped tie

    with pytest.raises(SystemExit, match="make-pairs pickapic: .*line 1, field 'jpg_1'.*missing.png"):
        (src / "bad.jsonl").write_text(json.dumps({**rows[0], "jpg_1": "missing.png"}) + "\n")
        main(["make-pairs", "pickapic", "--src", str(src / "bad.jsonl"), "--out", str(tmp_path / "bad"),
              "--image_root", str(src)])
    assert not (tmp_path / "bad" / "pairs.jsonl").exists()  # no pair file from a failed conversion
