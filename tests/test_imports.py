"""Every module of the four packages imports, and every name in ``__all__`` exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ("mmalign", "vision", "diffusion", "video")


def _modules() -> list[str]:
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}.")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_module_imports_and_exports(name: str) -> None:
    module = importlib.import_module(name)
    for exported in getattr(module, "__all__", []):
        assert hasattr(module, exported), f"{name}.__all__ names {exported!r}, which does not exist"


def test_core_does_not_import_the_modality_packages() -> None:
    """Dependency direction (DESIGN.md): mmalign imports none of vision, diffusion, video."""
    import ast
    from pathlib import Path

    root = Path(importlib.import_module("mmalign").__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in ("vision", "diffusion", "video"), f"{path.name} imports {mod}"
