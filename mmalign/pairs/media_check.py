"""The media check before training: decode every media file of a dataset once, name each bad one."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmalign.pairs.dataset import PairDataset
from mmalign.pairs.errors import PairFormatError, SkippedRow
from mmalign.pairs.jsonl import read_pairs_report
from mmalign.pairs.media import MAX_PIXELS, _decode_problem, resolve_media
from mmalign.pairs.record import PreferencePair, _media_fields

__all__ = ["MediaCheckReport", "check_media"]


@dataclass
class MediaCheckReport:
    """What :func:`check_media` found: the ``pairs`` whose media all decode, the ``skipped`` ones
    (with ``skip_bad=True``) and the number of distinct media ``files`` decoded."""

    pairs: list[PreferencePair]
    skipped: list[SkippedRow]
    files: int

    @property
    def bad(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        return (
            f"media check: {self.files} files in {len(self.pairs) + self.bad} pairs -> "
            f"kept {len(self.pairs)}, bad {self.bad}"
        )


def check_media(
    dataset: PairDataset | str | os.PathLike[str] | Iterable[PreferencePair],
    *,
    root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    follow_symlinks: bool = False,
) -> MediaCheckReport:
    """Decode every media file of a pair dataset once, before training, and name each bad one.

    ``dataset``: a :class:`PairDataset`, a dataset folder (read here; with ``skip_bad`` its bad
    rows are skipped and reported too), or pairs (resolved against ``root``, else each pair's
    :attr:`PreferencePair.root`). Each distinct file is opened, verified and
    decoded (:func:`load_image`; a JPEG at its smallest DCT scale) in a pool of ``workers``
    threads (default: the CPU count, at most 8) behind a ``tqdm`` bar (``progress``). A file is
    bad when it is missing, empty, not an image, corrupt, truncated, larger than ``max_pixels``,
    a symlink loop or unreadable.

    A bad file raises :class:`PairFormatError` for the first pair (in dataset order) that uses
    it, naming the pairs file, line (``"<pairs>"`` and the item number for pairs built in
    memory), field, pair id and media file, and counting the other bad files. With
    ``skip_bad=True`` the pairs using bad files are left out and listed in the report instead; a
    :class:`PairDataset` passed in is filtered in place (``pairs``, ``skipped``).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    read_skipped: list[SkippedRow] = []
    if isinstance(dataset, PairDataset):
        pairs = dataset.pairs
        root = root if root is not None else dataset.root
    elif isinstance(dataset, str | os.PathLike):
        root = root if root is not None else dataset
        # missing files are found by the decode below, so with skip_bad they are counted there
        pairs, read_skipped = read_pairs_report(dataset, skip_bad=skip_bad, check_media="none")
    else:
        pairs = list(dataset)
    problems: dict[int, tuple[int, str, str]] = {}  # pair index -> (field order, field, reason) of its first
    users: dict[Path, list[tuple[int, int, str]]] = {}  # file -> (pair index, field order, field) using it
    unresolved: set[tuple[Path, str]] = set()  # paths that leave the folder or loop
    for i, pair in enumerate(pairs):
        folder = Path(root) if root is not None else pair.root
        for k, (name, rel) in enumerate(_media_fields(pair)):
            if folder is None:
                raise ValueError(f"pair {pair.id!r} has media but no dataset folder: pass root=")
            try:
                path = resolve_media(folder, rel, follow_symlinks=follow_symlinks)
            except PairFormatError as exc:
                problems.setdefault(i, (k, name, exc.reason))
                unresolved.add((folder, rel))
                continue
            users.setdefault(path, []).append((i, k, name))
    bad_files = len(unresolved)
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with (
        ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool,
        tqdm(total=len(users), desc="checking media", unit="file", disable=not progress) as bar,
    ):
        futures = {pool.submit(_decode_problem, path, max_pixels): path for path in users}
        for future in as_completed(futures):
            bar.update()
            problem = future.result()
            if problem is None:
                continue
            bad_files += 1
            for i, k, name in users[futures[future]]:
                if i not in problems or k < problems[i][0]:
                    problems[i] = (k, name, problem)
    kept: list[PreferencePair] = []
    skipped: list[SkippedRow] = []
    for i, pair in enumerate(pairs):
        if i not in problems:
            kept.append(pair)
            continue
        source, line, unit = pair.origin or ("<pairs>", i + 1, "item")
        _, name, problem = problems[i]
        row = SkippedRow(line, name, f"pair {pair.id!r}: {problem}", source, unit)
        if not skip_bad:
            others = len(problems) - 1
            more = f" (and {others} more bad pair(s))" if others else ""
            raise PairFormatError(
                f"{row.reason}{more}; {bad_files} bad media file(s) in all: pass skip_bad=True to skip "
                "the pairs that use them",
                source=source, line=line, field=name, unit=unit,
            )
        skipped.append(row)
    if isinstance(dataset, PairDataset):
        dataset.pairs = kept
        dataset.skipped.extend(skipped)
    return MediaCheckReport(pairs=kept, skipped=read_skipped + skipped, files=len(users))
