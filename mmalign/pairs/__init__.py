"""Preference pairs: the record, the on-disk dataset, and converters from public layouts.

A *pair dataset* is a folder::

    my_pairs/
      pairs.jsonl          one PreferencePair per line (UTF-8 JSON object, ``\\n``-terminated)
      media/...            images (or video frames) named by relative POSIX paths in the pairs

The same columns may instead live in ``pairs.parquet`` (``meta`` stored as a JSON string) or in
an HF ``datasets`` folder ``pairs_hf/`` (``save_to_disk`` layout; needs the ``datasets`` extra).
Media paths never leave the folder: absolute paths, ``..`` components, backslashes and symlinks
resolving outside the folder (or looping) are rejected with an error naming file, line and field.
Readers check by default only that media files exist; :func:`check_media` decodes every file once
(in a thread pool) and names file, pair id, line and field of each bad one: training commands call
it before the first step.

The modules, each importable on its own (every public name is also here):

* :mod:`~mmalign.pairs.record`: :class:`PreferencePair`, its checks and labels, its JSON line;
* :mod:`~mmalign.pairs.errors`: :class:`PairFormatError`, :class:`MediaError`, reports;
* :mod:`~mmalign.pairs.media`: media paths, :func:`resolve_media`, :func:`load_image`, :func:`add_media`;
* :mod:`~mmalign.pairs.jsonl`: :class:`PairWriter` (crash-safe appends), :func:`write_pairs`, :func:`read_pairs`;
* :mod:`~mmalign.pairs.formats`: Parquet and HF ``datasets``;
* :mod:`~mmalign.pairs.dataset`: :class:`PairDataset`;
* :mod:`~mmalign.pairs.media_check`: :func:`check_media`, the decode of every file before training;
* converters: :mod:`~mmalign.pairs.trl`, :mod:`~mmalign.pairs.pickapic` (with DCPO's captions),
  :mod:`~mmalign.pairs.stic`, :mod:`~mmalign.pairs.povid`, on the shared :mod:`~mmalign.pairs.convert`.

No pickle is used anywhere: JSON, Parquet and Arrow only.
"""

from __future__ import annotations

from mmalign.pairs.convert import flatten_messages
from mmalign.pairs.dataset import PairDataset
from mmalign.pairs.errors import ConversionReport, MediaError, PairFormatError, SkippedRow
from mmalign.pairs.formats import (
    from_hf_dataset,
    read_hf,
    read_parquet,
    to_hf_dataset,
    write_hf,
    write_parquet,
)
from mmalign.pairs.jsonl import PairWriter, read_pairs, read_pairs_report, write_pairs
from mmalign.pairs.media import (
    MAX_PIXELS,
    add_media,
    check_rel_path,
    image_size,
    load_image,
    pair_media_path,
    resolve_media,
)
from mmalign.pairs.media_check import MediaCheckReport, check_media
from mmalign.pairs.pickapic import from_pickapic, to_pickapic
from mmalign.pairs.povid import from_povid
from mmalign.pairs.record import (
    PAIRS_HF,
    PAIRS_JSONL,
    PAIRS_PARQUET,
    VALID_LABELS,
    CheckMedia,
    PreferencePair,
    _parse_json_object,  # noqa: F401  (imported from here by existing code)
)
from mmalign.pairs.stic import from_stic
from mmalign.pairs.trl import from_trl, to_trl

__all__ = [
    "PAIRS_JSONL",
    "PAIRS_PARQUET",
    "PAIRS_HF",
    "VALID_LABELS",
    "MAX_PIXELS",
    "CheckMedia",
    "PairFormatError",
    "MediaError",
    "SkippedRow",
    "ConversionReport",
    "PreferencePair",
    "check_rel_path",
    "pair_media_path",
    "resolve_media",
    "load_image",
    "image_size",
    "check_media",
    "MediaCheckReport",
    "add_media",
    "PairWriter",
    "write_pairs",
    "read_pairs",
    "read_pairs_report",
    "write_parquet",
    "read_parquet",
    "to_hf_dataset",
    "from_hf_dataset",
    "write_hf",
    "read_hf",
    "PairDataset",
    "flatten_messages",
    "from_trl",
    "to_trl",
    "from_pickapic",
    "to_pickapic",
    "from_stic",
    "from_povid",
]
