"""Evidence helpers shared by the toy-world demos: paired bootstrap, a markdown table, labelled grids.

A demo measures one metric per held-out item before and after a method (e.g. the 0/1 ``ok`` of
:meth:`mmalign.toyworld.Checker.accuracy`), and reports the mean change with a 95% paired-bootstrap
interval (:func:`paired_bootstrap`) as a :class:`DemoRow`. :func:`rows_markdown` renders rows as
the table the documentation shows; :func:`save_grid` and :func:`save_before_after` write labelled
PNG sheets (PIL's default font) atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.files import atomic_write_bytes
from mmalign.toyworld import BACKGROUND, as_uint8

__all__ = [
    "DemoRow",
    "GUTTER",
    "LINE_HEIGHT",
    "load_rows",
    "paired_bootstrap",
    "rows_markdown",
    "save_before_after",
    "save_grid",
    "save_rows",
]

#: pixel height of one line of label text under a grid cell
LINE_HEIGHT = 12
#: white pixels between neighbouring grid cells
GUTTER = 2


@dataclass
class DemoRow:
    """One result: ``metric`` of ``method`` on ``n`` held-out items, before and after.

    ``lo``/``hi``: the 95% paired-bootstrap interval of (after - before). Higher is better unless
    ``note`` says otherwise.
    """

    method: str
    metric: str
    before: float
    after: float
    lo: float
    hi: float
    n: int
    note: str = ""

    @classmethod
    def from_scores(
        cls,
        method: str,
        metric: str,
        before: Sequence[float] | np.ndarray,
        after: Sequence[float] | np.ndarray,
        *,
        note: str = "",
        n_boot: int = 2000,
        seed: int = 0,
    ) -> DemoRow:
        """A row from per-item scores before and after (paired, same items in the same order)."""
        b = np.asarray(before, dtype=np.float64).reshape(-1)
        a = np.asarray(after, dtype=np.float64).reshape(-1)
        _, lo, hi = paired_bootstrap(b, a, n_boot=n_boot, seed=seed)
        return cls(method, metric, float(b.mean()), float(a.mean()), lo, hi, int(b.size), note)


def paired_bootstrap(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean diff, lo, hi)``: mean of ``after - before`` over paired items and its 95% percentile
    bootstrap interval (items resampled with replacement, ``n_boot`` times, seeded).

    Identical ``before`` and ``after`` give exactly ``(0.0, 0.0, 0.0)``.
    """
    b = np.asarray(before, dtype=np.float64).reshape(-1)
    a = np.asarray(after, dtype=np.float64).reshape(-1)
    if b.shape != a.shape:
        raise ValueError(
            f"before has {b.size} items but after has {a.size}; a paired bootstrap needs equal lengths"
        )
    if b.size == 0:
        raise ValueError("paired_bootstrap needs at least one item")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap: before/after contain NaN or inf")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, (1 << 22) // n)  # bounded memory: at most ~4M indices at once
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def rows_markdown(rows: Sequence[DemoRow]) -> str:
    """A markdown table: method | metric | before | after | change [95% CI] | held-out n | note."""
    lines = [
        "| method | metric | before | after | change [95% CI] | held-out n | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        change = f"{r.after - r.before:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]"
        lines.append(
            f"| {_cell(r.method)} | {_cell(r.metric)} | {r.before:.3f} | {r.after:.3f} | {change} | {r.n} | {_cell(r.note)} |"
        )
    return "\n".join(lines) + "\n"


def save_rows(rows: Sequence[DemoRow], path: str | os.PathLike[str]) -> None:
    """Write rows as a JSON list of objects (``rows.json``), atomically."""
    data = json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n"
    atomic_write_bytes(path, data.encode())


def load_rows(path: str | os.PathLike[str]) -> list[DemoRow]:
    """Read rows written by :func:`save_rows`; a bad row raises ValueError naming file and row."""
    items = json.loads(Path(path).read_text())
    rows = []
    for i, item in enumerate(items):
        try:
            rows.append(DemoRow(**item))
        except TypeError as exc:
            raise ValueError(f"{path}: row {i}: {exc}") from exc
    return rows


def _wrap(draw: Any, font: Any, text: str, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels (a word longer than a line is cut)."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        words = para.split()
        line = ""
        for word in words:
            cand = f"{line} {word}".strip()
            if draw.textlength(cand, font=font) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = 1
                for cut in range(len(word) - 1, 0, -1):
                    if draw.textlength(word[:cut], font=font) <= width:
                        break
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def save_grid(
    images: Sequence[Any],
    labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    ncol: int = 8,
    scale: int = 3,
) -> None:
    """A labelled PNG grid, written atomically: images row-major, ``min(ncol, len(images))`` columns,
    each image scaled ``scale`` times (nearest neighbour) with its label wrapped below it.

    Size: width ``cols * (W * scale + GUTTER) - GUTTER``; height ``rows * (H * scale + LINE_HEIGHT * L + 2
    + GUTTER) - GUTTER``, where ``L`` is the most lines any label needs. Images are HxWx3 uint8 arrays, PIL images or CHW tensors, all
    of one size.
    """
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(labels):
        raise ValueError(f"save_grid: {len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("save_grid: no images")
    if ncol < 1 or scale < 1:
        raise ValueError(f"save_grid: ncol and scale must be >= 1, got ncol={ncol}, scale={scale}")
    arrays = [as_uint8(im) for im in images]
    h, w = arrays[0].shape[:2]
    for i, arr in enumerate(arrays):
        if arr.shape[:2] != (h, w):
            raise ValueError(f"save_grid: image {i} is {arr.shape[1]}x{arr.shape[0]}, image 0 is {w}x{h}")
    cols = min(ncol, len(arrays))
    rows = -(-len(arrays) // cols)
    cell_w, cell_h = w * scale, h * scale
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, font, lab, cell_w - 2) for lab in labels]
    label_h = LINE_HEIGHT * max(len(x) for x in wrapped) + 2
    step_x, step_y = cell_w + GUTTER, cell_h + label_h + GUTTER
    sheet = Image.new("RGB", (cols * step_x - GUTTER, rows * step_y - GUTTER), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (arr, lines) in enumerate(zip(arrays, wrapped, strict=True)):
        r, c = divmod(i, cols)
        x, y = c * step_x, r * step_y
        tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 1, y + cell_h + 1 + j * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_before_after(
    before_images: Sequence[Any],
    after_images: Sequence[Any],
    labels: Sequence[str],
    path: str | os.PathLike[str],
    *,
    ncol: int = 8,
    scale: int = 3,
) -> None:
    """Before/after sheet: for each block of ``ncol`` prompts, a row labelled "before: <label>" above a
    row labelled "after: <label>" (the last block padded with blank cells)."""
    if not len(before_images) == len(after_images) == len(labels):
        raise ValueError(
            f"save_before_after: {len(before_images)} before images, {len(after_images)} after images, "
            f"{len(labels)} labels; they must match"
        )
    if not labels:
        raise ValueError("save_before_after: no images")
    before = [as_uint8(im) for im in before_images]
    after = [as_uint8(im) for im in after_images]
    blank = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.uint8), before[0].shape).copy()
    cols = min(ncol, len(labels))
    cells: list[np.ndarray] = []
    texts: list[str] = []
    for start in range(0, len(labels), cols):
        block = range(start, min(start + cols, len(labels)))
        pad = cols - len(block)
        cells += [before[i] for i in block] + [blank] * pad
        texts += [f"before: {labels[i]}" for i in block] + [""] * pad
        cells += [after[i] for i in block] + [blank] * pad
        texts += [f"after: {labels[i]}" for i in block] + [""] * pad
    save_grid(cells, texts, path, ncol=cols, scale=scale)
