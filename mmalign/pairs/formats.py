"""The same pair columns in Parquet (``pairs.parquet``) and HF ``datasets`` (``pairs_hf/``).

``meta`` is stored as a JSON string column. The HF folder is ``save_to_disk``'s layout (Arrow and
JSON, no pickle) and needs the optional ``datasets`` package.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmalign.files import atomic_write_bytes
from mmalign.pairs.errors import PairFormatError, SkippedRow
from mmalign.pairs.record import (
    PAIRS_HF,
    CheckMedia,
    PreferencePair,
    _check_before_write,
    _collect_pairs,
    _parse_json_object,
)

__all__ = ["write_parquet", "read_parquet", "to_hf_dataset", "from_hf_dataset", "write_hf", "read_hf"]


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("chosen_media", pa.list_(pa.string())),
            ("rejected_media", pa.list_(pa.string())),
            ("chosen_caption", pa.string()),
            ("rejected_caption", pa.string()),
            ("label", pa.float64()),
            ("meta", pa.string()),
        ]
    )


def _table_records(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any] | PairFormatError]]:
    for i, row in enumerate(rows, start=1):
        row = dict(row)
        meta = row.get("meta")
        if isinstance(meta, str):
            try:
                row["meta"] = _parse_json_object(meta)
            except ValueError as exc:
                yield i, PairFormatError(f"meta is not a JSON object string: {exc}", field="meta")
                continue
        yield i, row


def _rows_for_table(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    rows = []
    for pair in pairs:
        row = pair.to_dict()
        row["meta"] = json.dumps(row["meta"], ensure_ascii=False, allow_nan=False)
        rows.append(row)
    return rows


def write_parquet(
    pairs: Iterable[PreferencePair], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write pairs to a Parquet file (``meta`` as a JSON string column), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True")
    pairs = list(pairs)
    _check_before_write(pairs, path.parent, path, check_media=False)
    table = pa.Table.from_pylist(_rows_for_table(pairs), schema=_arrow_schema())
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())
    return path


def read_parquet(
    path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    check_media: CheckMedia = "exists",
    orient: bool = True,
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    """Read pairs from a Parquet file written by :func:`write_parquet`; ``root`` defaults to its folder."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise PairFormatError(f"cannot read Parquet file: {exc}", source=str(path)) from exc
    return _collect_pairs(
        _table_records(table.to_pylist()),
        source=str(path),
        unit="row",
        root=Path(root) if root is not None else path.parent,
        skip_bad=skip_bad,
        check_media=check_media,
        orient=orient,
    )


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "HF datasets support needs the optional 'datasets' package: pip install 'mmalign[datasets]'"
        ) from exc
    return datasets


def to_hf_dataset(pairs: Iterable[PreferencePair]) -> Any:
    """An in-memory ``datasets.Dataset`` with the pair columns (``meta`` as a JSON string)."""
    datasets = _import_datasets()
    schema = _arrow_schema()
    rows = _rows_for_table(list(pairs))
    return datasets.Dataset.from_list(rows, features=datasets.Features.from_arrow_schema(schema))


def from_hf_dataset(
    dataset: Any,
    *,
    root: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    check_media: CheckMedia = "exists",
    orient: bool = True,
    source: str = "<datasets.Dataset>",
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    """Pairs from a ``datasets.Dataset`` with the pair columns; returns (pairs, skipped)."""
    return _collect_pairs(
        _table_records(iter(dataset)),
        source=source,
        unit="row",
        root=Path(root) if root is not None else None,
        skip_bad=skip_bad,
        check_media=check_media,
        orient=orient,
    )


def write_hf(
    folder: str | os.PathLike[str],
    pairs: Iterable[PreferencePair],
    *,
    overwrite: bool = False,
    check_media: bool = True,
) -> Path:
    """Save pairs as an HF ``datasets`` folder ``folder/pairs_hf`` (Arrow + JSON, no pickle)."""
    import shutil

    folder = Path(folder)
    dest = folder / PAIRS_HF
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True")
    pairs = list(pairs)
    _check_before_write(pairs, folder, dest, check_media=check_media)
    dataset = to_hf_dataset(pairs)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PAIRS_HF}.", dir=folder))
    try:
        dataset.save_to_disk(str(tmp / "data"))
        if dest.exists():
            old = folder / f".{PAIRS_HF}.old"
            os.replace(dest, old)
            os.replace(tmp / "data", dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "data", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_hf(
    folder: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_media: CheckMedia = "exists",
    orient: bool = True,
) -> tuple[list[PreferencePair], list[SkippedRow]]:
    """Read ``folder/pairs_hf`` saved by :func:`write_hf`; returns (pairs, skipped)."""
    datasets = _import_datasets()
    folder = Path(folder)
    path = folder / PAIRS_HF
    dataset = datasets.load_from_disk(str(path))
    return from_hf_dataset(
        dataset, root=folder, skip_bad=skip_bad, check_media=check_media, orient=orient, source=str(path)
    )
