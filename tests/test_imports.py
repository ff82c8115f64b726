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


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import statement in ``package``."""
    import ast
    from pathlib import Path

    root = Path(importlib.import_module(package).__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((path.name, node.module or ""))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_nothing_imports_scripts(package: str) -> None:
    assert not [(f, m) for f, m in _imports(package) if m.split(".")[0] == "scripts"]


def test_modalities_do_not_import_each_other() -> None:
    """vision and diffusion never import another modality. video reuses the VLM code it shares with
    vision (the adapter, generation helpers, model loading) and nothing else of it; never diffusion."""
    for package, banned in (("vision", {"diffusion", "video"}), ("diffusion", {"vision", "video"})):
        assert not [(f, m) for f, m in _imports(package) if m.split(".")[0] in banned], package
    video = {m for _, m in _imports("video") if m.split(".")[0] in ("vision", "diffusion")}
    assert video <= {"vision.adapter", "vision.generate", "vision.train"}, video
