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


MODALITIES = ("vision", "diffusion", "video")
#: the one documented exception to "modalities never import each other": video reuses the VLM code it
#: shares with vision (the adapter, generation helpers, model loading) and nothing else of it
VIDEO_MAY_USE = {"vision.adapter", "vision.generate", "vision.train"}


def _imports(package: str) -> list[tuple[str, str]]:
    """(file relative to the package, absolute imported module) for every import statement anywhere in
    ``package`` (sub-packages included; relative imports resolved, so ``from ..x import y`` counts too)."""
    import ast
    from pathlib import Path

    root = Path(importlib.import_module(package).__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = [package, *rel.with_suffix("").parts]
        package_of_file = parts[:-1]  # what a relative import with one dot names
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(str(rel), a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    found.append((str(rel), node.module or ""))
                else:  # relative: the file's package, then up one package per extra dot
                    base = package_of_file[: len(package_of_file) - (node.level - 1)]
                    found.append((str(rel), ".".join([*base, node.module] if node.module else base)))
    return found


def test_import_scan_sees_subpackages_and_relative_imports() -> None:
    """The rules below are only as good as the scan: it reads every file of a sub-package (mmalign.pairs,
    mmalign.tiny) and resolves relative imports to absolute names."""
    files = {f for f, _ in _imports("mmalign")}
    assert any(f.startswith("pairs/") for f in files) and any(f.startswith("tiny/") for f in files)
    modules = {m for _, m in _imports("mmalign")}
    assert "mmalign.pairs.record" in modules and "mmalign.tiny.registry" in modules


def test_core_does_not_import_the_modality_packages() -> None:
    """Dependency direction (DESIGN.md): mmalign, sub-packages included, imports none of vision, diffusion, video."""
    bad = [(f, m) for f, m in _imports("mmalign") if m.split(".")[0] in MODALITIES]
    assert not bad, bad


@pytest.mark.parametrize("package", PACKAGES)
def test_nothing_imports_scripts(package: str) -> None:
    """Nothing under the four packages imports ``scripts/`` (the scripts are thin wrappers over them)."""
    bad = [(f, m) for f, m in _imports(package) if m.split(".")[0] == "scripts"]
    assert not bad, bad


def test_modalities_do_not_import_each_other() -> None:
    """vision and diffusion never import another modality; video only the shared VLM code of vision
    (VIDEO_MAY_USE, pinned) and never diffusion."""
    for package in MODALITIES:
        others = set(MODALITIES) - {package}
        used = {m for _, m in _imports(package) if m.split(".")[0] in others}
        if package == "video":
            assert used <= VIDEO_MAY_USE, sorted(used - VIDEO_MAY_USE)
        else:
            assert not used, (package, sorted(used))
