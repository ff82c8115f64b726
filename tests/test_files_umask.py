"""Outputs honour the umask: safetensors and mkstemp create 0600 files, which nobody else can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.files import file_mode, honour_umask
from mmalign.pairs import PairWriter, PreferencePair, write_pairs


def _modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_pair_datasets_are_readable_as_the_umask_allows(tmp_path):
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    with PairWriter(tmp_path / "a") as writer:
        rel = writer.add_media(image, "media/x.png")
        writer.write(PreferencePair("p", "q", "yes", "no", [rel], [rel]))
    write_pairs(tmp_path / "b", [PreferencePair("p", "q", "yes", "no")])
    assert _modes(tmp_path / "a") == _modes(tmp_path / "b") == {file_mode()}


def test_safetensors_outputs_are_widened_to_the_umask(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": __import__("torch").zeros(2)}, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # what the writer library does on its own
    honour_umask(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == file_mode() == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_tiny_models_and_adapters_are_shared(tmp_path):
    from mmalign.tiny import cached_tiny

    assert _modes(cached_tiny("causal_lm")) == {file_mode()}
