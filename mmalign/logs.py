"""What the commands print: our messages and progress bars, not the libraries' chatter.

The ``mmalign`` entry point and the ``scripts/`` wrappers call :func:`quiet_libraries` once, before
a job runs. It turns down what a user of a command cannot act on:

* transformers and diffusers log at ``error`` (their warnings about tiny or randomly built
  components, casts, LoRA prefixes, ...), unless ``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY``
  say otherwise;
* their per-file loading bars ("Loading weights", "Loading pipeline components...", "Writing model
  shards") are off. Our own bars (training, pair generation, ReNO, media checks) and a pipeline's
  sampling bar are plain tqdm and stay;
* the Python warnings listed in :data:`NOISE_WARNINGS`, matched by message, are ignored; every other
  warning still shows.

``MMALIGN_VERBOSE=1`` (or ``mmalign --verbose <command>``) leaves everything as the libraries have it.

The libraries are set up when they are imported, not imported here: a command that never loads
diffusers does not pay for importing it (:func:`after_import`).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["NOISE_WARNINGS", "VERBOSE_ENV", "after_import", "is_verbose", "quiet_libraries"]

VERBOSE_ENV = "MMALIGN_VERBOSE"
"""Environment variable: ``1`` (or ``true``, ``yes``) shows every library message again."""

NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers 5 renamed the property; peft still reads the old name on every PeftModel
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # diffusers renamed from_pretrained's torch_dtype to dtype; the pipeline loader passes torch_dtype, which
    # every diffusers version the project supports accepts
    (r"`torch_dtype` is deprecated", FutureWarning),
)
"""(message regex, category) of warnings that say nothing a user of a command can act on."""


def is_verbose() -> bool:
    """True when ``MMALIGN_VERBOSE`` asks for every library message."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _RunAfterExec:
    """Loader wrapper: execute the module with the real loader, then call ``then(module)``; every other
    loader method (``get_source`` for tracebacks, resource readers) is the real loader's."""

    def __init__(self, loader: Any, then: Callable[[ModuleType], None]) -> None:
        self._loader, self._then = loader, then

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then(module)


class _AfterImportFinder:
    """Finds nothing itself: for a watched module name it asks the other finders, then wraps the loader."""

    def __init__(self) -> None:
        self.actions: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        then = self.actions.pop(name, None)
        if then is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader, then)
                return spec
        return None


_FINDER = _AfterImportFinder()


def after_import(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call ``then(module)`` once module ``name`` is imported: now if it already is, else right after
    its first import (the module is not imported here)."""
    if name in sys.modules:
        then(sys.modules[name])
        return
    _FINDER.actions[name] = then
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _quiet_hf_logging(env: str) -> Callable[[ModuleType], None]:
    def quiet(logging_module: ModuleType) -> None:
        if not os.environ.get(env):  # the user's own choice of verbosity wins
            logging_module.set_verbosity_error()
        logging_module.disable_progress_bar()

    return quiet


def quiet_libraries(verbose: bool | None = None) -> bool:
    """Turn down library noise for a command (see the module docstring); return whether it did.

    ``verbose``: show everything (default: :func:`is_verbose`). Safe to call more than once.
    """
    if is_verbose() if verbose is None else verbose:
        return False
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    after_import("transformers.utils.logging", _quiet_hf_logging("TRANSFORMERS_VERBOSITY"))
    after_import("diffusers.utils.logging", _quiet_hf_logging("DIFFUSERS_VERBOSITY"))
    return True
