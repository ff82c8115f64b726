"""File permissions of what the project writes: the user's umask, not the writer library's 0600.

safetensors' ``save_file`` (and so every ``save_pretrained`` of weights) and ``tempfile.mkstemp``
create files readable by their owner only, whatever the umask. Outputs meant to be shared (pair
datasets, caches, checkpoints, adapters, pipelines) then cannot be read by a serving account or a
colleague on shared storage. :func:`honour_umask` gives a file, or a folder and everything in it,
the mode a plain ``open()``/``mkdir()`` would have had under the current umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "file_mode", "fsync_dir", "honour_umask", "replace_dir"]

_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        # os.umask can only be read by setting it; done once (the umask of a process rarely changes).
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (e.g. 0o644)."""
    return 0o666 & ~_umask()


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Set ``path`` (a file, or a folder recursively) to the modes the umask allows for new files/folders."""
    root = Path(path)
    dir_mode = 0o777 & ~_umask()
    targets = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, dir_mode if p.is_dir() else file_mode())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (files created, renamed or deleted in it) to the disk; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``dest`` whole or not at all: a temporary file beside it (the umask's mode, not mkstemp's
    0600), fsynced with ``durable``, renamed over ``dest``, the folder fsynced."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(dest.parent)


def replace_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Put the complete folder ``tmp`` in place of ``out`` (absent or an older copy); return ``out``.

    The old copy is moved aside first and deleted only once the new one is in place, so a crash leaves
    either folder whole at ``out`` (or the old one at ``.<name>.old`` for a moment); the parent folder is
    fsynced.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return out
