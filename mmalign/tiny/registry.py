"""The registry of tiny builders (``tiny:<name>`` model names) and the on-disk cache of their folders."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmalign.files import honour_umask
from mmalign.tiny.openclip import make_tiny_open_clip
from mmalign.tiny.pipelines import make_tiny_flux, make_tiny_sd, make_tiny_sd3, make_tiny_sdxl
from mmalign.tiny.text import make_tiny_causal_lm
from mmalign.tiny.video_llm import make_tiny_llava_next_video, make_tiny_llava_onevision
from mmalign.tiny.vlm import (
    make_tiny_idefics3,
    make_tiny_llava,
    make_tiny_llava_next,
    make_tiny_qwen2_5_vl,
    make_tiny_qwen2vl,
    make_tiny_smolvlm,
)

__all__ = ["TINY_BUILDERS", "cached_tiny"]

TINY_BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": make_tiny_llava,
    "qwen2vl": make_tiny_qwen2vl,
    "llava_next": make_tiny_llava_next,
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
    "idefics3": make_tiny_idefics3,
    "smolvlm": make_tiny_smolvlm,
    "causal_lm": make_tiny_causal_lm,
    "sd": make_tiny_sd,
    "sdxl": make_tiny_sdxl,
    "sd3": make_tiny_sd3,
    "flux": make_tiny_flux,
    "open_clip": make_tiny_open_clip,
    "llava_next_video": make_tiny_llava_next_video,
    "llava_onevision": make_tiny_llava_onevision,
}

_MEMO: dict[str, Path] = {}


def _cache_root() -> Path:
    env = os.environ.get("MMALIGN_TINY_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "mmalign-tiny-cache"


def _first_party_file(module: str) -> Path | None:
    """The source file of ``mmalign`` module ``module`` (dotted name), or ``None`` if it names no module."""
    root = Path(__file__).resolve().parents[2]  # the folder holding the mmalign package
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _source_files(start: Path) -> tuple[Path, ...]:
    """``start`` and every ``mmalign`` module it imports, transitively (found by reading the files)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                found = _first_party_file(name) if name.split(".")[0] == "mmalign" else None
                if found is not None:
                    todo.append(found)
    return tuple(sorted(seen))


def _builder_sources(builder: Callable[..., Path]) -> tuple[Path, ...]:
    """The source files a builder's output depends on: the file that defines it and every ``mmalign``
    module that file imports, transitively (the shared tokenizers, :func:`mmalign.utils.seeded`, ...)."""
    func = builder.func if isinstance(builder, functools.partial) else builder
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if path is None:
        raise ValueError(f"cannot find the source file of tiny builder {builder!r}")
    return _source_files(Path(path).resolve())


def _cache_key(name: str, kwargs: dict[str, Any]) -> str:
    """Name + kwargs + a digest of the builder's source files (:func:`_builder_sources`) and the library
    versions, so a stale build is never reused and a change to one family rebuilds only that family."""
    import diffusers
    import transformers

    digest = hashlib.sha256()
    for path in _builder_sources(TINY_BUILDERS[name]):
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{transformers.__version__}|{diffusers.__version__}".encode())
    digest.update(json.dumps(kwargs, sort_keys=True, default=str).encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def cached_tiny(name: str, **kw: Any) -> Path:
    """Build tiny model ``name`` (a key of :data:`TINY_BUILDERS`) once and return its folder.

    The folder lives under ``$MMALIGN_TINY_CACHE`` (default ``<system temp>/mmalign-tiny-cache``), keyed by
    the name, the keyword arguments, the library versions and a digest of the builder's source files (its
    own module and the ``mmalign`` modules that one imports), so editing one family rebuilds only that family. A build goes to
    a private temporary folder that is renamed into place atomically, so concurrent processes (pytest-xdist
    workers) never see a half-written model; a process that loses the race discards its copy. Treat the
    returned folder as read-only: copy it before modifying or training in place.
    """
    if name not in TINY_BUILDERS:
        raise KeyError(f"cached_tiny: unknown tiny model {name!r}; known: {sorted(TINY_BUILDERS)}")
    key = _cache_key(name, kw)
    if key in _MEMO and _MEMO[key].is_dir():
        return _MEMO[key]
    root = _cache_root()
    final = root / key
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            TINY_BUILDERS[name](staging, **kw)
            honour_umask(staging)  # shared by every user of the machine's cache
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # the rename failed for a reason other than losing the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _MEMO[key] = final
    return final
