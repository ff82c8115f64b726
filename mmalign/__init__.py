"""mmalign: preference alignment for the models that see (shared core)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
