"""The commands print our messages and progress bars, not the libraries' chatter (:mod:`mmalign.logs`)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mmalign.logs import NOISE_WARNINGS, after_import, quiet_libraries

ROOT = Path(__file__).resolve().parents[1]

#: what `mmalign reno` on a tiny pipeline printed on stderr before the libraries were quieted
NOISE = (
    "Loading pipeline components",  # diffusers' per-component loading bar
    "Loading weights",  # transformers' per-tensor loading bar (the CLIP text encoder)
    "Writing model shards",  # transformers' saving bar (a tiny model built on first use)
    "is deprecated",  # FutureWarning: `torch_dtype` is deprecated (diffusers)
    "FutureWarning",
    "should be kept in float32",  # diffusers' cast warning
)


@pytest.mark.slow
def test_reno_stderr_has_our_bar_and_none_of_the_library_noise(tmp_path, tiny_sd_path) -> None:  # noqa: ANN001
    """``mmalign reno`` on the tiny SD pipeline (one subprocess, ~10 s CPU): our "ReNO" bar and the
    summary show, the loading bars, cast warnings and deprecation warnings do not."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MMALIGN_VERBOSE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mmalign", "reno", "--pipeline", str(tiny_sd_path), "--reward", "redness:1",
           "--steps", "1", "--height", "16", "--width", "16", "--out", str(tmp_path / "reno"), "a red fox"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ReNO (process 0)" in proc.stderr  # our own progress bar stays
    assert [n for n in NOISE if n in proc.stderr] == [], proc.stderr[-3000:]
    assert json.loads((tmp_path / "reno" / "rewards.json").read_text())["per_prompt"][0]["prompt"] == "a red fox"


def test_quiet_libraries_filters_only_the_listed_warnings_and_keeps_our_logs(caplog) -> None:  # noqa: ANN001
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert quiet_libraries(verbose=False) is True
        warnings.warn("`torch_dtype` is deprecated and will be removed in version 1.0.0.", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`torch_dtype` is deprecated", UserWarning, stacklevel=1)  # another category: shown
        warnings.warn("some other thing is deprecated", FutureWarning, stacklevel=1)
    assert [(type(w.message), str(w.message)) for w in seen] == [
        (UserWarning, "`torch_dtype` is deprecated"), (FutureWarning, "some other thing is deprecated")]
    assert len(NOISE_WARNINGS) == 2
    with caplog.at_level(logging.WARNING, logger="mmalign.engine"):
        logging.getLogger("mmalign.engine").warning("our warning")
    assert "our warning" in caplog.text


def test_quiet_libraries_sets_transformers_logging_and_verbose_leaves_it(monkeypatch) -> None:  # noqa: ANN001
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        with warnings.catch_warnings():
            assert quiet_libraries(verbose=True) is False  # --verbose / MMALIGN_VERBOSE=1: untouched
            assert hf_logging.get_verbosity() == logging.WARNING and hf_logging.is_progress_bar_enabled()
            monkeypatch.setenv("MMALIGN_VERBOSE", "1")
            assert quiet_libraries() is False
            monkeypatch.setenv("MMALIGN_VERBOSE", "0")
            assert quiet_libraries() is True  # transformers is imported: set now
        assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_after_import_runs_after_the_first_import_and_keeps_the_loader(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "mmalign_noise_probe.py").write_text("VALUE = 1\n\ndef f():\n    return VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls: list[int] = []
    after_import("mmalign_noise_probe", lambda module: calls.append(module.VALUE))
    assert calls == [] and "mmalign_noise_probe" not in sys.modules  # not imported by after_import
    try:
        module = importlib.import_module("mmalign_noise_probe")
        assert calls == [1] and module.f() == 1
        assert "return VALUE" in module.__loader__.get_source("mmalign_noise_probe")  # tracebacks keep source
        after_import("mmalign_noise_probe", lambda module: calls.append(2))  # imported already: at once
        assert calls == [1, 2]
    finally:
        sys.modules.pop("mmalign_noise_probe", None)
