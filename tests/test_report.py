"""Evidence helpers: the paired bootstrap, the markdown table, labelled grids and rows files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmalign import report
from mmalign.report import DemoRow


def test_bootstrap_of_identical_runs_is_exactly_zero() -> None:
    x = np.random.default_rng(0).integers(0, 2, size=200).astype(float)
    assert report.paired_bootstrap(x, x) == (0.0, 0.0, 0.0)


def test_bootstrap_covers_zero_without_a_shift_and_excludes_it_with_one() -> None:
    rng = np.random.default_rng(1)
    before = rng.integers(0, 2, size=300).astype(float)
    noise = rng.integers(0, 2, size=300).astype(float)  # same distribution, no shift
    diff, lo, hi = report.paired_bootstrap(before, noise)
    assert lo < 0 < hi and lo <= diff <= hi
    after = np.where(rng.random(300) < 0.3, 1.0, before)  # ~30% of items flip to right
    diff, lo, hi = report.paired_bootstrap(before, after)
    assert diff == pytest.approx(float((after - before).mean()))
    assert 0 < lo <= diff <= hi


def test_bootstrap_is_seeded_and_checks_inputs() -> None:
    rng = np.random.default_rng(2)
    before, after = rng.random(50), rng.random(50)
    assert report.paired_bootstrap(before, after, seed=3) == report.paired_bootstrap(before, after, seed=3)
    assert report.paired_bootstrap(before, after, seed=3) != report.paired_bootstrap(before, after, seed=4)
    # a large n is resampled in several chunks (bounded memory) and still gives a sensible interval
    big_b, big_a = rng.random(5000), rng.random(5000)
    _, lo, hi = report.paired_bootstrap(big_b, big_a, n_boot=1000)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="equal lengths"):
        report.paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        report.paired_bootstrap([1.0, float("nan")], [1.0, 2.0])


def test_row_from_scores() -> None:
    before = np.array([0, 0, 1, 1, 0, 1, 0, 0], float)
    after = np.array([1, 0, 1, 1, 1, 1, 0, 1], float)
    row = DemoRow.from_scores("dpo", "checker accuracy", before, after, note="held-out pairs")
    assert (row.before, row.after, row.n) == (0.375, 0.75, 8)
    assert (row.lo, row.hi) == report.paired_bootstrap(before, after)[1:]
    assert row.lo <= row.after - row.before <= row.hi


def test_rows_markdown_and_rows_file(tmp_path) -> None:
    rows = [
        DemoRow("dpo", "checker accuracy", 0.41, 0.57, 0.08, 0.24, 96),
        DemoRow("stic", "hallucination rate", 0.30, 0.25, -0.09, -0.01, 60, "lower is better | fewer"),
    ]
    md = report.rows_markdown(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | metric | before | after | change [95% CI] | held-out n | note |"
    assert lines[2] == "| dpo | checker accuracy | 0.410 | 0.570 | +0.160 [+0.080, +0.240] | 96 |  |"
    assert lines[3].startswith("| stic | hallucination rate | 0.300 | 0.250 | -0.050 [-0.090, -0.010] | 60 |")
    assert "lower is better \\| fewer" in lines[3]  # a '|' in a note does not break the table
    path = tmp_path / "rows.json"
    report.save_rows(rows, path)
    assert report.load_rows(path) == rows
    path.write_text('[{"method": "x"}]')
    with pytest.raises(ValueError, match="row 0"):
        report.load_rows(path)


def test_grid_size_and_content(tmp_path) -> None:
    images = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(5)]
    path = tmp_path / "grid.png"
    report.save_grid(images, [f"#{i}" for i in range(5)], path, ncol=3, scale=2)
    sheet = np.asarray(Image.open(path))
    one_line = report.LINE_HEIGHT + 2
    g = report.GUTTER
    assert sheet.shape == (2 * (32 + one_line + g) - g, 3 * (32 + g) - g, 3)
    # image 4 sits in row 1, column 1, scaled 2x
    y, x = 32 + one_line + g, 32 + g
    assert (sheet[y : y + 32, x : x + 32] == 160).all()
    # labels are drawn: dark text pixels under the first cell
    assert (sheet[32 : 32 + one_line, :32] < 128).any()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left


def test_grid_wraps_long_labels_and_rejects_bad_input(tmp_path) -> None:
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    path = tmp_path / "g.png"
    report.save_grid(images, ["a red circle to the left of a blue square", "x"], path, scale=3)
    height = Image.open(path).size[1]
    assert height > 24 + 2 * report.LINE_HEIGHT  # the long label took several lines
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        report.save_grid(images, ["x"], path)
    with pytest.raises(ValueError, match="image 1 is 4x4"):
        report.save_grid([images[0], np.zeros((4, 4, 3), np.uint8)], ["a", "b"], path)


def test_before_after_sheet(tmp_path) -> None:
    before = [np.full((8, 8, 3), 10, np.uint8)] * 3
    after = [np.full((8, 8, 3), 250, np.uint8)] * 3
    path = tmp_path / "ba.png"
    report.save_before_after(before, after, ["p0", "p1", "p2"], path, ncol=2)
    sheet = np.asarray(Image.open(path))
    cell, g = 8 * 3, report.GUTTER
    assert sheet.shape[1] == 2 * (cell + g) - g
    step_y = (sheet.shape[0] + g) // 4  # two blocks of two rows (before, after)
    assert sheet.shape[0] == 4 * step_y - g
    for block in range(2):
        top = 2 * block * step_y
        assert (sheet[top : top + cell, :cell] == 10).all()  # before row
        assert (sheet[top + step_y : top + step_y + cell, :cell] == 250).all()  # after row
    with pytest.raises(ValueError, match="must match"):
        report.save_before_after(before, after[:2], ["a", "b", "c"], path)
