"""A map-style torch ``Dataset`` of pairs (adapters collate them)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mmalign.pairs.errors import PairFormatError, SkippedRow
from mmalign.pairs.jsonl import read_pairs_report
from mmalign.pairs.record import CheckMedia, PreferencePair, _check_pair_media, _check_unique_ids

__all__ = ["PairDataset"]


class PairDataset(Dataset):
    """A map-style torch ``Dataset`` of :class:`PreferencePair` (adapters collate them).

    ``PairDataset(folder)`` reads the folder (same options as :func:`read_pairs_report`);
    ``PairDataset(pairs, root=folder)`` wraps pairs already in memory. ``skipped`` lists rows
    left out with ``skip_bad=True``; ``root`` is the dataset folder (also set on every item).
    Use ``DataLoader(ds, collate_fn=adapter.collate)``.
    """

    def __init__(
        self,
        folder_or_pairs: str | os.PathLike[str] | Iterable[PreferencePair],
        *,
        root: str | os.PathLike[str] | None = None,
        skip_bad: bool = False,
        check_media: CheckMedia = "exists",
        orient: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(folder_or_pairs, str | os.PathLike):
            self.root: Path | None = Path(folder_or_pairs)
            self.pairs, self.skipped = read_pairs_report(
                self.root, skip_bad=skip_bad, check_media=check_media, orient=orient
            )
        else:
            self.root = Path(root) if root is not None else None
            self.pairs = []
            self.skipped = []
            pairs = list(folder_or_pairs)
            for pair in pairs:
                if not isinstance(pair, PreferencePair):
                    raise TypeError(f"expected PreferencePair items, got {type(pair).__name__}")
            _check_unique_ids(pairs, "<pairs>")
            for i, pair in enumerate(pairs, start=1):
                if self.root is not None:
                    try:
                        _check_pair_media(pair, self.root, check_media)
                    except PairFormatError as exc:
                        err = exc.at("<pairs>", i, "item")
                        if not skip_bad:
                            raise err from None
                        self.skipped.append(SkippedRow(i, err.field, err.reason, "<pairs>", "item"))
                        continue
                    pair.with_root(self.root)
                self.pairs.append(pair.oriented() if orient else pair)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]

    def load_images(self, index: int) -> tuple[list[Image.Image], list[Image.Image]]:
        """Chosen and rejected media of item ``index`` as RGB PIL images."""
        return self.pairs[index].load_images()
